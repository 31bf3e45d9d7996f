"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for the real huggingface_hub client (HF_ENDPOINT).

It answers the calls that `create_repo`, `list_repo_commits`, `list_repo_files` and `create_commit` make, keeps repos
in memory, records every request (method, path, Authorization header, time), and can be told to answer a request
with an error first (`fail`), as the real Hub does under load.
"""
import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_PATH = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)/(commits|tree|preupload|commit)/([^/?]+)")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}    # (type, id) -> {"files", "commits", "private"}
        self.requests: list[dict] = []
        self.failures: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, path_part: str, status: int, headers: dict | None = None, error: str = "") -> None:
        """Answer the next `method` request whose path contains `path_part` with `status` (in the order added)."""
        self.failures.append({"method": method, "path": path_part, "status": status, "headers": headers or {},
                              "error": error or f"fake hub: {status}"})

    def calls(self, method: str, path_part: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and path_part in r["path"]]

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        return self.repos[(repo_type, repo_id)]["files"]

    # What the real Hub does, for the calls above
    def create(self, body: dict) -> tuple[int, object]:
        repo_type, repo_id = body.get("type") or "model", f"{body['organization']}/{body['name']}"
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        initial = {"id": hashlib.sha1(repo_id.encode()).hexdigest(), "title": "initial commit", "message": "",
                   "authors": [], "date": "2026-01-01T00:00:00.000Z"}
        self.repos[(repo_type, repo_id)] = {"files": {".gitattributes": b"*.safetensors filter=lfs\n"},
                                            "commits": [initial], "private": body.get("visibility") == "private"}
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return 200, {"url": f"{self.url}/{prefix}{repo_id}"}

    def commit(self, repo: dict, repo_id: str, ndjson: bytes) -> tuple[int, object]:
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        for line in lines:
            if line["key"] == "file":
                repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                repo["files"].pop(line["value"]["path"], None)
        oid = hashlib.sha1(f"{repo_id}{len(repo['commits'])}{ndjson!r}".encode()).hexdigest()
        message = f"{header['summary']}\n\n{header.get('description', '')}".strip()
        repo["commits"].insert(0, {"id": oid, "title": header["summary"], "message": message, "authors": [],
                                   "date": "2026-01-01T00:00:00.000Z"})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if method == "POST" and path == "/api/repos/create":
            return self.create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}
        match = REPO_PATH.match(path)
        if not match:
            return 404, {"error": f"fake hub: no route for {method} {path}"}
        repo_type, repo_id, action = match.group(1)[:-1], match.group(2), match.group(3)
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return 404, {"error": f"Repository Not Found for url: {path}."}
        if method == "GET" and action == "commits":
            return 200, repo["commits"]
        if method == "GET" and action == "tree":
            return 200, [{"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                         for name, data in sorted(repo["files"].items())]
        if method == "POST" and action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in json.loads(body)["files"]]}
        if method == "POST" and action == "commit":
            return self.commit(repo, repo_id, body)
        return 404, {"error": f"fake hub: no route for {method} {path}"}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                with hub.lock:
                    hub.requests.append({"method": method, "path": path, "time": time.monotonic(),
                                         "authorization": self.headers.get("Authorization")})
                    failure = next((f for f in hub.failures if f["method"] == method and f["path"] in path), None)
                    if failure:
                        hub.failures.remove(failure)
                        status, payload, headers = failure["status"], {"error": failure["error"]}, failure["headers"]
                    else:
                        (status, payload), headers = hub.answer(method, path, body), {}
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                   **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

        return Handler
