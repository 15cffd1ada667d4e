"""A tiny in-memory Hugging Face Hub for tests (stdlib only).

It speaks the subset of the Hub HTTP API that huggingface_hub 2.4 and transformers use to create
model repos, push files and download them again:

    POST /api/repos/create                              create a model repo (409 + url if it exists)
    POST /api/validate-yaml                             README.md metadata check (always valid)
    GET  /api/whoami-v2                                 who the token belongs to
    GET  /api/agent-harnesses                           empty registry (huggingface_hub telemetry probe)
    GET  /api/models/{ns}/{name}[/revision/{rev}]       repo info: sha, private, siblings
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]    tree listing (?recursive=true), single page
    POST /api/models/{ns}/{name}/paths-info/{rev}       info on given paths (form field `paths`)
    POST /api/models/{ns}/{name}/preupload/{rev}        upload mode: always "regular", plus remote oid
    POST /api/models/{ns}/{name}/commit/{rev}           ndjson commit: file / deletedFile / deletedFolder
    HEAD|GET /{ns}/{name}/resolve/{rev}/{path}          file bytes + X-Repo-Commit, ETag, Content-Length

Behaviour worth knowing:
- Preupload always answers uploadMode "regular", so files travel base64-encoded inside the commit
  payload and neither LFS nor xet is ever used. The "oid" it returns (git blob sha1 of the file on
  the branch) is what lets the client drop unchanged files, so re-uploading identical content
  creates no commit ("No files have been modified since last commit").
- upload_folder (with hf_xet installed) starts a new commit once ~100 MB of regular content has
  accumulated, so very large folders land as several commits ("... (part 2)").
- A new repo has no commit at all (the real Hub adds one with .gitattributes); `main` then points
  to nothing. Only existing branches can be committed to: `main` always exists, any other name
  answers 404 RevisionNotFound. Reads accept a branch name or a full 40-hex commit oid.
- Repo ids must be "namespace/name"; create_repo without a namespace uses the user "test-user".
- Auth: `Authorization: Bearer <token>`. Writes need the right token (401 otherwise). A wrong
  token is refused on every route, as on the Hub. Private repos read without the right token
  answer 401 RepoNotFound; missing repos 404 RepoNotFound (401 when unauthenticated).
- Missing files answer 404 with X-Error-Code EntryNotFound and X-Repo-Commit, so optional-file
  probes (adapter_config.json, *.index.json) behave as on the Hub.
- `fail_next_commit = n` makes the next n commit POSTs fail with `fail_status` (500) after the body
  was read, creating nothing. Note that upload_folder retries its commit POST on 408/429/500/502/503/504 up to
  5 times with backoff (1+2+4+8+8 s), so with 500 it only raises when n >= 6; create_commit does
  not retry. Set `fail_status` to a non-retried code (e.g. 501 or 400) for a fast, single failure.
- No LFS, no pull requests (create_pr answers 400), no datasets/spaces, no pagination, no Range.
"""

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "test-user"


def git_blob_oid(data: bytes) -> str:
    """The git sha1 of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answered to the client: status, message and optional X-Error-Code header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class LocalHub:
    """The server plus its in-memory state. Use as `with LocalHub() as hub:` or `LocalHub().start()`.

    commits(), files() and repo() read the state directly (KeyError for an unknown repo, HubError for
    an unknown revision); `requests` logs every (method, path) served, for debugging.
    """

    def __init__(self, token: str = "hf_test"):
        self.token = token
        self.url = ""
        self.fail_next_commit = 0
        self.fail_status = 500
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, dict] = {}  # repo_id -> {"private", "commits": [...], "branches": {name: oid}}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHub":
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection (for tests)
    def commits(self, repo_id: str) -> list[dict]:
        with self._lock:
            return [{"oid": c["oid"], "message": c["message"], "files": dict(c["files"])}
                    for c in self._repos[repo_id]["commits"]]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            commit = self._resolve(self._repos[repo_id], revision)
            return dict(commit["files"]) if commit else {}

    def repo(self, repo_id: str) -> dict:
        with self._lock:
            r = self._repos[repo_id]
            return {"id": repo_id, "private": r["private"], "branches": dict(r["branches"])}

    # ------------------------------------------------------------------ storage helpers
    def _resolve(self, repo: dict, revision: str) -> dict | None:
        """The commit a branch name or commit oid points to (None for an empty branch)."""
        if revision in repo["branches"]:
            oid = repo["branches"][revision]
            return next(c for c in repo["commits"] if c["oid"] == oid) if oid else None
        for commit in repo["commits"]:
            if commit["oid"] == revision:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo_id: str, branch: str, message: str, description: str, files: dict) -> dict:
        repo = self._repos[repo_id]
        parent = repo["branches"][branch]
        seed = f"{repo_id}\n{parent}\n{message}\n{time.time_ns()}\n{len(repo['commits'])}"
        commit = {"oid": hashlib.sha1(seed.encode()).hexdigest(), "message": message,
                  "description": description, "parent": parent, "files": files,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        repo["commits"].append(commit)
        repo["branches"][branch] = commit["oid"]
        return commit


def _tree_entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Tree listing under `prefix` ("" for the root), files and directories, as the Hub returns it."""
    base = prefix.strip("/") + "/" if prefix.strip("/") else ""
    entries: dict[str, dict] = {}
    for path in sorted(files):
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        for depth in range(1, len(parts)):  # directories on the way to the file
            if depth > 1 and not recursive:
                break
            folder = base + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                        "oid": hashlib.sha1(folder.encode()).hexdigest()})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_oid(files[path])}
    return list(entries.values())


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the bound subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body=None, headers: dict | None = None) -> None:
        if isinstance(body, bytes):
            data, ctype = body, "application/octet-stream"
        else:
            data, ctype = json.dumps(body).encode(), "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        body = self._read_body()
        segs = [unquote(s) for s in url.path.strip("/").split("/")]
        try:
            auth = self._auth()
            if auth == "bad":
                raise HubError(401, "Invalid credentials in Authorization header")
            with self.hub._lock:
                status, payload, headers = self._route(segs, parse_qs(url.query), body, auth == "ok")
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "replace").decode(), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            status, payload = e.status, {"error": e.message, **e.extra}
        except Exception as e:  # a bug in the server: surface it to the client instead of hanging
            status, payload, headers = 500, {"error": f"LocalHub internal error: {e!r}"}, {}
        self._send(status, payload, headers)

    def _auth(self) -> str:
        header = self.headers.get("Authorization")
        if not header:
            return "none"
        return "ok" if header == f"Bearer {self.hub.token}" else "bad"

    def _repo(self, repo_id: str, authed: bool) -> dict:
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo["private"] and not authed):
            raise HubError(404 if authed else 401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------ routes
    def _route(self, segs: list[str], query: dict, body: bytes, authed: bool):
        method = self.command
        if method == "POST" and segs == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"), authed)
        if method == "POST" and segs == ["api", "validate-yaml"]:
            return 200, {"errors": [], "warnings": []}, {}
        if method == "GET" and segs == ["api", "agent-harnesses"]:
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if method == "GET" and segs == ["api", "whoami-v2"]:
            if not authed:
                raise HubError(401, "Invalid credentials in Authorization header")
            return 200, {"type": "user", "name": DEFAULT_USER, "orgs": [], "auth": {"type": "access_token"}}, {}
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                return self._repo_info(repo_id, rest[1] if rest else "main", query, authed)
            if len(rest) >= 2:
                action, revision, path = rest[0], rest[1], "/".join(rest[2:])
                if method == "GET" and action == "tree":
                    return self._tree(repo_id, revision, path, query, authed)
                if method == "POST" and action == "paths-info":
                    return self._paths_info(repo_id, revision, parse_qs(body.decode()), authed)
                if method == "POST" and action in ("preupload", "commit"):
                    if not authed:
                        raise HubError(401, "You must be authenticated with a write token to do this")
                    if "create_pr" in query:
                        raise HubError(400, "LocalHub does not support pull requests (create_pr)")
                    if action == "preupload":
                        return self._preupload(repo_id, revision, json.loads(body))
                    return self._commit(repo_id, revision, body)
        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve_file(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), authed)
        raise HubError(404, f"LocalHub: no route for {method} {self.path}")

    def _create_repo(self, payload: dict, authed: bool):
        if not authed:
            raise HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise HubError(400, "LocalHub only hosts model repos")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub._repos:
            # create_repo(exist_ok=True) reads the url from this 409 body
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub._repos[repo_id] = {"private": private, "commits": [], "branches": {"main": None}}
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _repo_info(self, repo_id: str, revision: str, query: dict, authed: bool):
        repo = self._repo(repo_id, authed)
        commit = self.hub._resolve(repo, revision)
        files = commit["files"] if commit else {}
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": p, **({"size": len(b), "blobId": git_blob_oid(b)} if blobs else {})}
                    for p, b in sorted(files.items())]
        date = commit["date"] if commit else "1970-01-01T00:00:00.000Z"
        return 200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                     "sha": commit["oid"] if commit else None, "private": repo["private"], "gated": False,
                     "disabled": False, "tags": [], "siblings": siblings, "lastModified": date,
                     "createdAt": date}, {}

    def _tree(self, repo_id: str, revision: str, path: str, query: dict, authed: bool):
        commit = self.hub._resolve(self._repo(repo_id, authed), revision)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(commit["files"] if commit else {}, path, recursive)
        if path and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return 200, entries, {}

    def _paths_info(self, repo_id: str, revision: str, form: dict, authed: bool):
        commit = self.hub._resolve(self._repo(repo_id, authed), revision)
        files = commit["files"] if commit else {}
        wanted = {p.strip("/") for p in form.get("paths", [])}
        entries = [e for e in _tree_entries(files, "", recursive=True) if e["path"] in wanted]
        return 200, entries, {}

    def _preupload(self, repo_id: str, revision: str, payload: dict):
        commit = self.hub._resolve(self._repo(repo_id, True), revision)
        files = commit["files"] if commit else {}
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in payload.get("files", [])]
        return 200, {"files": answer, "commitOid": commit["oid"] if commit else None}, {}

    def _commit(self, repo_id: str, branch: str, body: bytes):
        repo = self._repo(repo_id, True)
        if self.hub.fail_next_commit > 0:
            self.hub.fail_next_commit -= 1
            raise HubError(self.hub.fail_status, "LocalHub: simulated commit failure (fail_next_commit)")
        if branch not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {branch} (LocalHub commits only to existing branches)",
                           "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header, head = lines[0]["value"], repo["branches"][branch]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {branch} ({head})")
        head_commit = self.hub._resolve(repo, branch)
        files = dict(head_commit["files"]) if head_commit else {}
        for op in lines[1:]:
            key, value = op.get("key"), op.get("value", {})
            if key == "file":
                content = value["content"]
                files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" \
                    else content.encode()
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].strip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
            elif key == "lfsFile":
                raise HubError(400, "LocalHub does not store LFS files (preupload always answers 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self.hub._commit(repo_id, branch, header.get("summary", ""), header.get("description", ""), files)
        return 200, {"success": True, "commitOid": commit["oid"], "pullRequestUrl": None,
                     "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit['oid']}"}, {}

    def _resolve_file(self, repo_id: str, revision: str, path: str, authed: bool):
        commit = self.hub._resolve(self._repo(repo_id, authed), revision)
        if commit is None or path not in commit["files"]:
            headers = {"X-Repo-Commit": commit["oid"]} if commit else {}
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = commit["files"][path]
        return 200, data, {"X-Repo-Commit": commit["oid"], "ETag": f'"{git_blob_oid(data)}"'}


if __name__ == "__main__":
    with LocalHub() as hub:
        print(f"LocalHub serving at {hub.url} (token {hub.token!r}); Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
