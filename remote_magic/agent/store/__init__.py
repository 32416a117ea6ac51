"""What the agent keeps on disk besides a job's event log: blobs, a job's files (placed, and what it wrote:
``fetch``), environments and what a Python has installed (``versions``)."""
