"""What the agent keeps on disk besides the event log: blobs, job folders and their links, environments."""
