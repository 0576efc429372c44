"""The SDK worker command when workers are forked warm (pipelines/local/zygote.py).

Run as `python -I -S _worker_client.py SOCKET` by Beam's runner: it passes this
process's environment (the runner's control and logging addresses, the
pipeline options) and stdio to the zygote, which forks the worker, and exits
with the worker's status. Standard library only, so that it starts in
milliseconds.
"""
import json
import os
import socket
import sys

# The exit status when the worker ended without reporting one: killed (SIGKILL) or crashed.
NO_STATUS = 255


def main() -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sys.argv[1])
    env = json.dumps(dict(os.environ)).encode()
    socket.send_fds(conn, [len(env).to_bytes(8, "big")], [0, 1, 2])
    conn.sendall(env)
    status = b""
    while True:
        chunk = conn.recv(16)
        if not chunk:
            break
        status += chunk
    return int(status) if status.strip().lstrip(b"-").isdigit() else NO_STATUS


if __name__ == "__main__":
    sys.exit(main())
