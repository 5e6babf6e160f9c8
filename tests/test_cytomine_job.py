"""`pathapp cytomine job` against a local fake Cytomine server started by the test.

This is a protocol test, not a live Cytomine: the server below implements the documented REST
endpoints the job uses (Cytomine-core RestController shapes: `{"collection": [...], "size", ...}`
lists, `{"<domain>": {...}, "message"}` for created/updated objects, `"annotations 1,2 added"` for a
posted array), checks every request's `CYTOMINE <public>:<hmac-sha1>` signature with its own HMAC
code (not the client's), and serves the real CMU-1-Small-Region.svs as the image download.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import shapely
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.cytomine.client import CytomineClient, CytomineError
from pathapp.qupath.geojson import read_objects

PUBLIC, PRIVATE = "job-public-key", "job-private-key"
HEIGHT, WIDTH = 2967, 2220
GOOD, BROKEN, JOB_ID, PROJECT, ONTOLOGY, ROI_TERM = 11, 12, 7, 1, 5, 60
# ROI in top-left image px: the upper part of the slide (y 300..1300). Sent to the job in
# Cytomine's bottom-left frame; if the job forgot to flip it, tiles would land at y 1667..2667.
ROI_TOP_LEFT = shapely.box(300, 300, 1500, 1300)


class FakeCytomine:
    """State of the fake server: what was created, and every job update in order."""

    def __init__(self, slide: Path) -> None:
        self.slide = slide
        self.next_id = 1000
        self.job: dict[str, Any] = {"id": JOB_ID, "class": "be.cytomine.processing.Job", "status": 1,
                                    "progress": 0, "statusComment": None, "project": PROJECT, "software": 3}
        self.job_updates: list[dict[str, Any]] = []
        self.terms = [{"id": 50, "class": "be.cytomine.ontology.Term", "name": "Tumor", "color": "#ff0000",
                       "ontology": ONTOLOGY}]
        self.annotations: dict[int, dict[str, Any]] = {}
        self.properties: dict[int, dict[str, str]] = {}
        self.attached: list[tuple[str, str, int]] = []
        self.auth_failures = 0
        self.protocol_errors: list[str] = []
        flipped = shapely.transform(ROI_TOP_LEFT, lambda xy: xy * (1, -1) + (0, HEIGHT))
        self.roi = {"id": 900, "class": "be.cytomine.ontology.UserAnnotation", "image": GOOD,
                    "location": flipped.wkt, "term": [ROI_TERM]}

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def image(self, image_id: int) -> dict[str, Any]:
        name = "CMU-1-Small-Region.svs" if image_id == GOOD else "broken.svs"
        return {"id": image_id, "class": "be.cytomine.image.ImageInstance", "baseImage": image_id + 100,
                "project": PROJECT, "width": WIDTH, "height": HEIGHT, "physicalSizeX": 0.499,
                "instanceFilename": name, "originalFilename": name, "filename": name}


def collection(items: list) -> dict[str, Any]:
    return {"collection": items, "offset": 0, "perPage": len(items), "size": len(items), "totalPages": 1}


def expected_signature(method: str, content_type: str, date: str, path: str) -> str:
    token = "\n".join([method, "", content_type, date, path]).encode()
    return base64.b64encode(hmac.new(PRIVATE.encode(), token, hashlib.sha1).digest()).decode()


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def reply(self, code: int, body: Any = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorised(self) -> bool:
        auth = self.headers.get("authorization", "")
        m = re.fullmatch(r"CYTOMINE ([^:]+):(.+)", auth)
        date = self.headers.get("date", "")
        ok = bool(m and date and m.group(1) == PUBLIC and hmac.compare_digest(
            m.group(2), expected_signature(self.command, self.headers.get("content-type", ""), date, self.path)))
        if not ok:
            self.server.state.auth_failures += 1
            self.reply(401, {"errors": "Bad authentication"})
        return ok

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except AssertionError as e:  # a protocol check failed: tell the client and the test
            self.server.state.protocol_errors.append(f"{self.command} {self.path}: {e!r}")
            self.reply(400, {"errors": f"protocol check failed: {e!r}"})

    def do_GET(self) -> None:
        if not self.authorised():
            return
        st: FakeCytomine = self.server.state
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        p = url.path
        if p == "/api/user/current.json":
            return self.reply(200, {"id": 77, "class": "be.cytomine.security.UserJob", "username": "job7",
                                    "algo": True, "job": JOB_ID, "publicKey": PUBLIC})
        if p == f"/api/job/{JOB_ID}.json":
            return self.reply(200, st.job)
        if p == f"/api/project/{PROJECT}.json":
            return self.reply(200, {"id": PROJECT, "class": "be.cytomine.project.Project", "name": "demo",
                                    "ontology": ONTOLOGY})
        if p == f"/api/ontology/{ONTOLOGY}/term.json":
            return self.reply(200, collection(st.terms))
        if m := re.fullmatch(r"/api/imageinstance/(\d+)\.json", p):
            return self.reply(200, st.image(int(m.group(1))))
        if m := re.fullmatch(r"/api/imageinstance/(\d+)/download", p):
            data = st.slide.read_bytes() if int(m.group(1)) == GOOD else b"this is not a slide"
            return self.reply(200, raw=data)
        if p == "/api/annotation.json":
            image, term = int(q["image"]), int(q.get("term", -1))
            hits = [st.roi] if (image == GOOD and term == ROI_TERM and q.get("showWKT") == "true") else []
            return self.reply(200, collection(hits))
        self.reply(404, {"errors": {"message": f"no route {p}"}})

    def do_PUT(self) -> None:
        if not self.authorised():
            return
        st: FakeCytomine = self.server.state
        if self.path == f"/api/job/{JOB_ID}.json":
            body = json.loads(self.body())
            st.job.update({k: body[k] for k in ("status", "progress", "statusComment") if k in body})
            st.job_updates.append(dict(st.job))
            return self.reply(200, {"job": st.job, "message": "Job updated", "printMessage": True})
        self.reply(404, {"errors": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self.authorised():
            return
        st: FakeCytomine = self.server.state
        url = urlsplit(self.path)
        p = url.path
        if p == "/api/term.json":
            body = json.loads(self.body())
            term = {"id": st.new_id(), "class": "be.cytomine.ontology.Term", **body}
            st.terms.append(term)
            return self.reply(200, {"term": term, "message": "Term added"})
        if p == "/api/annotation.json":
            body = json.loads(self.body())
            items = body if isinstance(body, list) else [body]
            ids = []
            for item in items:
                geom = shapely.from_wkt(item["location"])
                assert item["image"] == GOOD and geom.is_valid
                ann = {"id": st.new_id(), "class": "be.cytomine.ontology.AlgoAnnotation", **item}
                st.annotations[ann["id"]] = ann
                ids.append(ann["id"])
            if isinstance(body, list):
                return self.reply(200, {"message": "annotations " + ",".join(map(str, ids)) + " added"})
            return self.reply(200, {"annotation": st.annotations[ids[0]], "message": "Annotation added"})
        if m := re.fullmatch(r"/api/annotation/(\d+)/property\.json", p):
            ann_id, body = int(m.group(1)), json.loads(self.body())
            assert ann_id in st.annotations and body["domainIdent"] == ann_id
            assert body["domainClassName"] == "be.cytomine.ontology.AlgoAnnotation"
            st.properties.setdefault(ann_id, {})[body["key"]] = body["value"]
            return self.reply(200, {"property": {"id": st.new_id(), **body}, "message": "Property added"})
        if p == "/api/attachedfile.json":
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                b"content-type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + self.body())
            part = next(iter(msg.iter_parts()))
            assert part.get_param("name", header="content-disposition") == "files[]"
            st.attached.append((part.get_filename(), q["domainClassName"], int(q["domainIdent"])))
            return self.reply(200, {"id": st.new_id(), "class": "be.cytomine.meta.AttachedFile",
                                    "filename": part.get_filename(), "domainIdent": int(q["domainIdent"])})
        self.reply(404, {"errors": {"message": f"no route {p}"}})


@pytest.fixture()
def server():
    state = FakeCytomine(data_file("wsi/aperio/CMU-1-Small-Region.svs"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from vit_factory import tiny_bundle

    folder = tmp_path_factory.mktemp("models")
    tiny_bundle(folder, num_classes=2, filename="tiny.pathapp")
    return folder


def job_argv(host: str, images: str, models: Path, work: Path, *extra: str) -> list[str]:
    return ["cytomine", "job", "--cytomine_host", host, "--cytomine_public_key", PUBLIC,
            "--cytomine_private_key", PRIVATE, "--cytomine_id_project", str(PROJECT),
            "--cytomine_id_software", "3", "--cytomine_id_images", images,
            "--cytomine_id_roi_term", str(ROI_TERM), "--model", "tiny", "--mpp", "2",
            "--models-dir", str(models), "--work-dir", str(work), "--device", "cpu", *extra]


def test_job_uploads_flipped_annotations_with_properties(server, models, tmp_path) -> None:
    state, host = server
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path, "--upload", "both"))
    assert res.exit_code == 0, res.output
    assert state.auth_failures == 0 and not state.protocol_errors

    statuses = [u["status"] for u in state.job_updates]
    assert statuses[0] == 2 and statuses[-1] == 3 and set(statuses) == {2, 3}
    assert state.job_updates[-1]["progress"] == 100

    out = tmp_path / str(GOOD) / "out"
    regions = read_objects(out / "annotations.geojson")
    tiles = read_objects(out / "tiles.geojson")
    assert regions and tiles
    assert len(state.annotations) == len(regions) + len(tiles)

    # Tiles are kept when their centre is in the ROI: as Cytomine draws it (bottom-left frame),
    # not where an unflipped ROI would put them.
    roi_cytomine = shapely.from_wkt(state.roi["location"])
    for ann in state.annotations.values():
        if "max prob" in state.properties[ann["id"]]:
            centre = shapely.from_wkt(ann["location"]).centroid
            assert roi_cytomine.contains(centre) and not ROI_TOP_LEFT.contains(centre)
    # The known polygons land where expected: every local top-left vertex (x, y) is (x, H - y) there.
    by_class = {}
    for ann in state.annotations.values():
        if len(state.properties[ann["id"]]) == 3:  # regions carry Area, Mean prob, Tiles
            by_class[tuple(ann["term"])] = shapely.from_wkt(ann["location"])
    assert len(by_class) == len(regions)
    term_of = {t["name"]: t["id"] for t in state.terms}
    assert term_of["Tumor"] == 50  # the existing term was reused, the other class got a new one
    for region in regions:
        got = by_class[(term_of[region.class_name],)]
        want = {(round(x, 2), round(HEIGHT - y, 2)) for x, y in shapely.get_coordinates(region.geometry)}
        assert {(round(x, 2), round(y, 2)) for x, y in shapely.get_coordinates(got)} == want
    # Properties carry the measurements.
    region_props = [state.properties[a["id"]] for a in state.annotations.values()
                    if "Mean prob" in state.properties[a["id"]]]
    class_regions = [r for r in regions if not r.class_name.startswith("QC: ")]  # QC regions overlap them
    assert sorted(float(p["Tiles"]) for p in region_props) == sorted(r.measurements["Tiles"] for r in class_regions)
    qc_terms = {t["name"] for t in state.terms if t["name"].startswith("QC: ")}
    assert qc_terms == {r.class_name for r in regions} - {r.class_name for r in class_regions}
    tile_props = [p for p in state.properties.values() if "max prob" in p]
    assert len(tile_props) == len(tiles)
    for p in tile_props:
        assert 0.5 <= float(p["max prob"]) <= 1.0
        assert abs(float(p["prob: Tumor"]) + float(p["prob: Stroma"]) - 1) < 1e-4
    assert {a[0] for a in state.attached} >= {f"{GOOD}-run.json", f"{GOOD}-overlay.png"}
    assert all(a[1:] == ("be.cytomine.processing.Job", JOB_ID) for a in state.attached)


def test_job_fails_with_reason_but_goes_past_a_broken_image(server, models, tmp_path) -> None:
    state, host = server
    res = CliRunner().invoke(cli, job_argv(host, f"{BROKEN},{GOOD}", models, tmp_path))
    assert res.exit_code != 0
    assert state.auth_failures == 0 and not state.protocol_errors
    final = state.job_updates[-1]
    assert final["status"] == 4 and len(final["statusComment"]) <= 255
    assert f"image {BROKEN}" in final["statusComment"] and "not a slide" in final["statusComment"]
    assert 2 in [u["status"] for u in state.job_updates]
    assert state.annotations, "the good image after the broken one was still analysed and uploaded"


def test_client_reports_server_errors_and_bad_keys(server) -> None:
    state, host = server
    with pytest.raises(CytomineError, match="HTTP 404: no route /api/nothing.json"):
        CytomineClient(host, PUBLIC, PRIVATE).get("nothing.json")
    with pytest.raises(CytomineError, match="HTTP 401: Bad authentication"):
        CytomineClient(host, PUBLIC, "wrong-private-key").current_user()
    assert state.auth_failures == 1
    with pytest.raises(CytomineError, match="cannot reach the server"):
        CytomineClient("http://127.0.0.1:9", PUBLIC, PRIVATE, timeout=2).current_user()
