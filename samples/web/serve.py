"""Serve the repository for the sample page, with the headers WebAssembly threads need (cross-origin isolation).

    python samples/web/serve.py [--port 8000]      then open http://localhost:8000/samples/web/

The page reads an export over HTTP from this server (default /demo-out/export, which `make demo` writes) and
onnxruntime-web from runtimes/js/node_modules (`cd runtimes/js && npm ci`).
"""
import argparse
import functools
import http.server
import os
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=lambda t: _port(t), default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    try:
        server = http.server.ThreadingHTTPServer((args.host, args.port), functools.partial(Handler, directory=REPO))
    except OSError as e:  # the port taken, most often
        what = "--host" if isinstance(e, socket.gaierror) else "--port"  # a name no resolver knows: not the port
        sys.exit(f"cannot serve at {args.host}:{args.port} ({e.strerror}); pass another {what}")
    try:  # the line said first inside: a Ctrl-C right after it (a test's, on a busy host) was Python's own traceback
        print(f"serving {REPO} at http://{args.host}:{server.server_address[1]}/samples/web/ (Ctrl-C stops it)",
              flush=True)
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop it: a traceback said nothing more
        print("stopped", file=sys.stderr)
        sys.exit(130)


def _port(text: str) -> int:
    """An argparse type: a port number, 0 (any free one) to 65535 (a larger one was an OverflowError traceback)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


if __name__ == "__main__":
    main()
