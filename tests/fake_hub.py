"""A local stand-in for the Hugging Face Hub's HTTP API, on loopback: enough of repo creation,
preupload and commit for huggingface_hub's create_repo and upload_folder. Received files are kept.
And a dataset repo's files laid out locally as on the Hub (write_dataset_repo)."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PIPELINE_TAGS = ("image-text-to-text", "text-generation", "image-to-text")


class FakeHub:
    def __init__(self):
        self.repos = {}  # repo_id -> {"private": bool, "files": {path: bytes}}
        self.requests = []
        self.create_requests = []
        self.validated = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _validate_yaml(self, request):
                """The card's YAML metadata: parsed and checked for the fields a model page needs."""
                content = request["content"]
                if content.startswith("---"):
                    content = content.split("---", 2)[1]
                metadata = yaml.safe_load(content) or {}
                hub.validated.append(metadata)
                errors = [f"missing {key}" for key in ("language", "license", "library_name", "pipeline_tag") if key not in metadata]
                if metadata.get("pipeline_tag") not in (None, *PIPELINE_TAGS):
                    errors.append(f"unknown pipeline_tag {metadata['pipeline_tag']}")
                # As the Hub does: base_model names models on the Hub, never a path.
                base = metadata.get("base_model")
                for name in [base] if isinstance(base, str) else base or []:
                    try:
                        validate_repo_id(name)
                    except HFValidationError:
                        errors.append(f"base_model {name!r} is not a valid model id")
                if errors:
                    return self._reply(400, {"error": "; ".join(errors)})
                return self._reply(200, {"warnings": []})

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    hub.create_requests.append(request)
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    private = bool(request.get("private")) or request.get("visibility") == "private"
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                parts = path.split("/")
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id = "/".join(parts[3:5])
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            value = entry["value"]
                            hub.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'1' * 40}", "commitOid": "1" * 40, "pullRequestUrl": None})
                self._reply(404, {"error": f"unknown endpoint {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def write_dataset_repo(folder, splits: dict, config_name: str = "default"):
    """A folder laid out as a Hub dataset repo: each split's datasets.Dataset shards as
    data/{split}-{i:05d}-of-{n:05d}.parquet, and README.md metadata naming them under `config_name`,
    as the Hub's Parquet conversions are; datasets' load_dataset reads it as it reads a Hub id."""
    (folder / "data").mkdir(parents=True)
    files = []
    for split, shards in splits.items():
        for index, shard in enumerate(shards):
            shard.to_parquet(str(folder / "data" / f"{split}-{index:05d}-of-{len(shards):05d}.parquet"))
        files.append({"split": split, "path": f"data/{split}-*.parquet"})
    card = yaml.safe_dump({"configs": [{"config_name": config_name, "data_files": files}]}, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{card}---\n", encoding="utf-8")
