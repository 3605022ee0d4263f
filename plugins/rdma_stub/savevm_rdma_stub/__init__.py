"""savevm rdma_stub plugin."""
