"""A transfer peer in its own process, so tests can SIGKILL it mid-stream.

python transfer_peer.py receiver RID TOKEN        -> prints the endpoint, then serves
python transfer_peer.py sender ENDPOINT RID TOKEN NBYTES -> paced send that takes seconds
"""

from __future__ import annotations

import sys
import time

import numpy as np
from transfer_helpers import FP, ArraySink, manifest

from prfaas_plugin.transfer import GrpcTcpReceiver, GrpcTcpSender, ItemSpec, SenderConfig


def main() -> None:
    role = sys.argv[1]
    if role == "receiver":
        rid, tok = sys.argv[2], sys.argv[3]
        rx = GrpcTcpReceiver()
        rx.expect(rid, tok, FP, ArraySink(), deadline_s=60)
        print(rx.endpoint, flush=True)
        time.sleep(60)
    elif role == "sender":
        endpoint, rid, tok, nbytes = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=2, pacing_gbps=0.1))
        data = np.ones(nbytes, dtype=np.uint8)
        h = tx.open(endpoint, manifest(rid, (ItemSpec("big", nbytes),)), tok, deadline_s=60)
        h.send("big", data)
        print("sending", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
