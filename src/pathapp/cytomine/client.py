"""A small typed client for the Cytomine REST API (core 3.x/4.x and Cytomine-ULiège), speaking the
protocol directly with `requests`.

Why not cytomine-python-client: `CytomineJob` exists only before 3.1, and 4.x pins exact versions of
requests, shapely and more that would override our own; a job needs only a dozen endpoints. This
module signs requests exactly as that client does (`cytomine/cytomine.py`, `CytomineAuth`):

    authorization: CYTOMINE <public key>:<base64(hmac-sha1(private key, token))>
    token = METHOD + "\\n" + content-MD5 (always empty) + "\\n" + content-type + "\\n" + date + "\\n"
            + "/api/" + the rest of the URL (path and query string)

JSON shapes (from Cytomine-core's RestController/ModelService): a list is
`{"collection": [...], "size", "offset", "perPage", "totalPages"}`; a created or updated object is
wrapped as `{"<domain>": {...}, "message": ...}`. A POSTed JSON array goes through
`ModelService.addMultiple`, which adds item by item and answers with the ids it created:
`"algoannotations 1,2,3 added"` (all), `"Only part of the entries (algoannotations 1,2) added."`
(206, with `errors`) or `"No entry saved"` (400). The Grails cores (<= 3.x) send that status as
the HTTP status; the Spring cores (Cytomine CE 2023+, `RestCytomineController.responseSuccess`)
answer HTTP 200 with `{"data": {"message", ...}, "status": 200|206|400}`. `BulkOutcome` reads both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pathapp.errors import PathappError
from pathapp.atomic import atomic_path

BASE_PATH = "/api/"
JSON = dict[str, Any]


class CytomineError(PathappError):
    """The Cytomine server refused a request (`status`: its HTTP status) or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class BulkOutcome:
    """What the server made of a POSTed JSON array: the ids it created, in the order of the items
    it accepted, and its messages for the items it refused (the ids do not say which those were)."""

    ids: list[int]
    status: int
    message: str
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == 200


def bulk_outcome(r: requests.Response, what: str) -> BulkOutcome:
    """Read an `addMultiple` answer from a Grails core (HTTP status) or a Spring core (the status
    inside an HTTP 200 body); anything else raises CytomineError."""
    body = r.json()
    data, status = body, r.status_code
    if isinstance(body, Mapping) and isinstance(body.get("data"), Mapping) and "status" in body:
        data, status = body["data"], int(body["status"])
    message = str(data.get("message", "")) if isinstance(data, Mapping) else ""
    if status not in (200, 206, 400):
        raise CytomineError(f"Cytomine POST {what}: HTTP {status}: {message or str(body)[:200]}", status)
    m = re.search(r"\b[a-z]+s ((?:\d+,)*\d+)", message)
    ids = [int(i) for i in m.group(1).split(",")] if m else []
    raw_errors = (data.get("errors") or data.get("error") or []) if isinstance(data, Mapping) else []
    errors = [str(e.get("message", e)) if isinstance(e, Mapping) else str(e) for e in raw_errors]
    return BulkOutcome(ids, status, message, errors)


def cytomine_date() -> str:
    """The `date` header value in the format the Cytomine clients send (and sign)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())


def signature(private_key: str, method: str, content_type: str, date: str, path_and_query: str) -> str:
    """Base64 HMAC-SHA1 of Cytomine's request token; the server recomputes it to authenticate."""
    token = f"{method}\n\n{content_type}\n{date}\n{path_and_query}"
    digest = hmac.new(private_key.encode("utf-8"), token.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class CytomineAuth(requests.auth.AuthBase):
    """Adds the signed `authorization` header; runs after the body is prepared, so a multipart
    upload signs its real content-type (with boundary)."""

    def __init__(self, public_key: str, private_key: str, base_url: str) -> None:
        self.public_key, self.private_key, self.base_url = public_key, private_key, base_url

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        date = r.headers.setdefault("date", cytomine_date())
        path = BASE_PATH + str(r.url)[len(self.base_url) :]
        sig = signature(self.private_key, str(r.method), r.headers.get("content-type", ""), date, path)
        r.headers["authorization"] = f"CYTOMINE {self.public_key}:{sig}"
        return r


def base_url(host: str) -> str:
    """`http(s)://host/api/` from a host given with or without a scheme (http when absent, as the
    Cytomine clients do)."""
    host = host.strip().rstrip("/")
    if not host:
        raise CytomineError("Cytomine host is empty: pass --cytomine_host (e.g. https://cytomine.example.org)")
    if not re.match(r"^https?://", host):
        host = "http://" + host
    return host + BASE_PATH


class CytomineClient:
    """Signed JSON calls plus the typed helpers the job needs. Errors raise CytomineError."""

    def __init__(self, host: str, public_key: str, private_key: str, *, timeout: float = 120.0) -> None:
        self.base_url = base_url(host)
        self.auth = CytomineAuth(public_key, private_key, self.base_url)
        self.timeout = timeout
        self.session = requests.Session()
        retry = Retry(total=3, backoff_factor=0.5, status_forcelist=(502, 503, 504), allowed_methods={"GET", "PUT"})
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    # -- transport ----------------------------------------------------------------------------
    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None, files: Any = None, stream: bool = False,
                ok: Iterable[int] = (200,), allow_redirects: bool = True) -> requests.Response:
        """One signed request to `/api/<path>`; a status outside `ok` raises CytomineError."""
        headers = {"accept": "application/json, */*", "X-Requested-With": "XMLHttpRequest"}
        url = self.base_url + path.lstrip("/")
        try:
            r = self.session.request(method, url, params=params, json=json, files=files, headers=headers,
                                     auth=self.auth, timeout=self.timeout, stream=stream,
                                     allow_redirects=allow_redirects)
        except requests.RequestException as e:
            raise CytomineError(f"Cytomine {method} {url}: cannot reach the server ({e}); check --cytomine_host") from e
        if r.status_code not in set(ok):
            raise CytomineError(f"Cytomine {method} /api/{path}: HTTP {r.status_code}: {_error_text(r)}", r.status_code)
        return r

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None).json()

    def post(self, path: str, body: Any, params: Mapping[str, Any] | None = None) -> JSON:
        return self.request("POST", path, json=body, params=params).json()

    def put(self, path: str, body: Any) -> JSON:
        return self.request("PUT", path, json=body).json()

    def collection(self, path: str, **params: Any) -> list[JSON]:
        """Every item of a list endpoint (max=0 asks the server for all of them at once)."""
        return list(self.get(path, max=0, offset=0, **params)["collection"])

    # -- typed helpers ------------------------------------------------------------------------
    def current_user(self) -> JSON:
        return self.get("user/current.json")

    def project(self, project_id: int) -> JSON:
        return self.get(f"project/{project_id}.json")

    def image_instance(self, image_id: int) -> JSON:
        return self.get(f"imageinstance/{image_id}.json")

    def project_images(self, project_id: int) -> list[JSON]:
        return self.collection(f"project/{project_id}/imageinstance.json")

    def job(self, job_id: int) -> JSON:
        return self.get(f"job/{job_id}.json")

    def update_job(self, job: JSON) -> JSON:
        """PUT the whole job (status, progress, statusComment); returns the server's copy."""
        return self.put(f"job/{job['id']}.json", job)["job"]

    def ontology_terms(self, ontology_id: int) -> list[JSON]:
        return self.collection(f"ontology/{ontology_id}/term.json")

    def create_term(self, name: str, color: str, ontology_id: int) -> JSON:
        return self.post("term.json", {"name": name, "color": color, "ontology": ontology_id})["term"]

    def annotations(self, image_id: int, term_id: int | None = None) -> list[JSON]:
        """Annotations of an image (optionally of one term), with their WKT `location`."""
        params: dict[str, Any] = {"image": image_id, "showWKT": "true", "showTerm": "true"}
        if term_id is not None:
            params["term"] = term_id
        return self.collection("annotation.json", **params)

    def annotation(self, annotation_id: int) -> JSON:
        return self.get(f"annotation/{annotation_id}.json")

    def add_annotations(self, items: list[JSON]) -> BulkOutcome:
        """POST a JSON array of annotations at once (`annotation.json`, every core)."""
        r = self.request("POST", "annotation.json", json=items, ok=(200, 206, 400))
        return bulk_outcome(r, "/api/annotation.json")

    def add_properties(self, domain_class: str, items: list[tuple[int, str, str]]) -> BulkOutcome:
        """(domain id, key, value) properties, many domain objects in one POSTed array.

        The route is `domain/{class}/{id}/property.json`, the official client's: every core accepts
        it, while the Spring cores map `annotation/{id}/property.json` for GET only. A JSON array
        goes to `addMultiple` on both (Grails `RestPropertyController.addPropertyDomain`, Spring
        `RestPropertyController.addProperty`); each item names its own domain object, which both
        keep, so the URL's id is only the route's."""
        body = [{"domainClassName": domain_class, "domainIdent": i, "key": k, "value": v} for i, k, v in items]
        path = f"domain/{domain_class}/{items[0][0]}/property.json"
        return bulk_outcome(self.request("POST", path, json=body, ok=(200, 206, 400)), f"/api/{path}")

    def download_status(self, image_id: int) -> int:
        """The status the server gives this user for an image's download, read from the answer's
        headers only (nothing is downloaded): a 403 means the right is missing."""
        r = self.request("GET", f"imageinstance/{image_id}/download", params={"parent": "false"}, stream=True,
                         ok=range(200, 600), allow_redirects=False)
        r.close()
        return r.status_code

    def attach_file(self, path: Path, domain_class: str, domain_id: int, name: str | None = None) -> JSON:
        """Upload a file as an AttachedFile of a domain object (here: the job)."""
        with open(path, "rb") as fh:
            r = self.request("POST", "attachedfile.json", files={"files[]": (name or Path(path).name, fh)},
                             params={"domainClassName": domain_class, "domainIdent": domain_id})
        return r.json()

    def download_image(self, image_id: int, dest: Path) -> Path:
        """Stream the original image file of an image instance to `dest` (atomically)."""
        r = self.request("GET", f"imageinstance/{image_id}/download", params={"parent": "false"}, stream=True)
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            for chunk in r.iter_content(chunk_size=1 << 20):
                fh.write(chunk)
        return Path(dest)


def _error_text(r: requests.Response) -> str:
    """The server's own error message (`errors` or `message`), else the start of the body."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:200] or r.reason
    if isinstance(body, Mapping):
        err = body.get("errors") or body.get("message")
        if isinstance(err, Mapping):
            err = err.get("message", err)
        if err:
            return str(err)[:200]
    return str(body)[:200]
