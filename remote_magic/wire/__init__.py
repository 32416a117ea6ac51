"""The client's end of the agent: typed calls over a pipe, the link, compression, the local blob cache, uploads."""
