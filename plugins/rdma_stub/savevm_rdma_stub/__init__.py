"""savevm RDMA-style transport: ``rdma:HOST:PORT`` moves pages through shared memory."""

from savevm_rdma_stub.plugin import RdmaChannel, RdmaTransport

__all__ = ["RdmaChannel", "RdmaTransport"]
