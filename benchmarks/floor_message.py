"""The floor of `messenger message`: the same JSON line to the node socket, nothing else."""

import json
import socket
import sys
import time

path, to, text = sys.argv[1:4]
until = str(int(time.time() * 1000) + 5000)  # as messenger/cli.py _local_call: a 5 s wait
with socket.socket(socket.AF_UNIX) as s:
    s.connect(path)
    request = {"op": "message", "to": to, "text": text, "wait_ms": "5000", "until_ms": until}
    s.sendall((json.dumps(request) + "\n").encode())
    print(json.loads(s.makefile().readline())["reply"])
