"""`pathapp cytomine job` against a local fake Cytomine server started by the test.

This is a protocol test, not a live Cytomine: the server below implements the documented REST
endpoints the job uses, checks every request's `CYTOMINE <public>:<hmac-sha1>` signature with its
own HMAC code (not the client's), and serves the real CMU-1-Small-Region.svs as the image download.
It answers as either kind of core, following their sources:

- "grails" (Cytomine-core <= 3.x, the only cores with the software router): job endpoints,
  `RestController.responseResult` sends a posted array's outcome as the HTTP status (200, 206
  "Only part of the entries (algoannotations 1,2) added.", 400), annotations a job posts are
  AlgoAnnotations, `annotation/{id}/property.json` and `domain/{class}/{id}/property.json` both
  take POSTs;
- "spring" (Cytomine CE 2023+, cytomine/Cytomine-core `RestCytomineController`): no job endpoints,
  a posted array answers HTTP 200 with `{"data": {...}, "status": 200|206|400}`,
  `annotation/{id}/property.json` is GET only (a POST gets 405), properties go to the domain route.

Rights follow `RestImageInstanceController.download` (403 unless the project allows downloads or
the user manages it; the answer is a redirect to the image server) and `TermService.add` (403
without write rights on the ontology).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import shapely
import shapely.affinity
from click.testing import CliRunner

from conftest import data_file
from pathapp.cli import cli
from pathapp.tiles.qc import ARTEFACTS
from pathapp.cytomine.client import CytomineClient, CytomineError
from pathapp.qupath.geojson import read_objects

PUBLIC, PRIVATE = "job-public-key", "job-private-key"
HEIGHT, WIDTH = 2967, 2220
GOOD, BROKEN, JOB_ID, PROJECT, ONTOLOGY, ROI_TERM = 11, 12, 7, 1, 5, 60
ALGO = "be.cytomine.ontology.AlgoAnnotation"
# ROI in top-left image px: the upper part of the slide (y 300..1300). Sent to the job in
# Cytomine's bottom-left frame; if the job forgot to flip it, tiles would land at y 1667..2667.
ROI_TOP_LEFT = shapely.box(300, 300, 1500, 1300)


class FakeCytomine:
    """State of the fake server: what was created, every job update in order, and the requests."""

    def __init__(self, slide: Path, core: str = "grails") -> None:
        self.slide, self.core = slide, core
        self.next_id = 1000
        self.job: dict[str, Any] = {"id": JOB_ID, "class": "be.cytomine.processing.Job", "status": 1,
                                    "progress": 0, "statusComment": None, "project": PROJECT, "software": 3}
        self.job_updates: list[dict[str, Any]] = []
        self.terms = [{"id": 50, "class": "be.cytomine.ontology.Term", "name": "Tumor", "color": "#ff0000",
                       "ontology": ONTOLOGY}]
        self.annotations: dict[int, dict[str, Any]] = {}
        self.properties: dict[int, dict[str, str]] = {}
        self.attached: list[tuple[str, str, int]] = []
        self.requests: list[tuple[str, str]] = []
        self.auth_failures = 0
        self.protocol_errors: list[str] = []
        self.image_bytes_served = 0
        # rights and quirks a test can change
        self.downloadable, self.manager, self.ontology_writable = False, True, True
        self.size = (WIDTH, HEIGHT)  # the image as Cytomine shows it
        self.refuse = lambda item: False  # annotations the server will not create (-> 206)
        self.roi = {"id": 900, "class": "be.cytomine.ontology.UserAnnotation", "image": GOOD, "term": [ROI_TERM]}

    def roi_for(self) -> dict[str, Any]:
        """The ROI annotation where Cytomine draws it: its own px, bottom-left origin."""
        sx, sy = self.size[0] / WIDTH, self.size[1] / HEIGHT
        geom = shapely.transform(ROI_TOP_LEFT, lambda xy: xy * (sx, -sy) + (0, self.size[1]))
        return {**self.roi, "location": geom.wkt}

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def image(self, image_id: int) -> dict[str, Any]:
        name = "CMU-1-Small-Region.svs" if image_id == GOOD else "broken.svs"
        return {"id": image_id, "class": "be.cytomine.image.ImageInstance", "baseImage": image_id + 100,
                "project": PROJECT, "width": self.size[0], "height": self.size[1], "physicalSizeX": 0.499,
                "instanceFilename": name, "originalFilename": name, "filename": name}

    def bulk(self, handler: Handler, domain: str, ids: list[int], errors: list[dict]) -> None:
        """`ModelService.addMultiple`'s answer, sent the way each core sends it."""
        ok = ",".join(map(str, ids))
        if not errors:
            status, data = 200, {"message": f"{domain}s {ok} added"}
        elif not ids:
            status, data = 400, {"success": False, "message": "No entry saved", "errors": errors}
        elif self.core == "grails":
            status, data = 206, {"success": False, "message": f"Only part of the entries ({domain}s {ok}) added.",
                                 "errors": errors}
        else:  # the Spring core's message lacks the closing parenthesis
            status, data = 206, {"success": False, "message": f"Only part of the entries ({domain}s {ok}",
                                 "errors": errors}
        if self.core == "spring":
            handler.reply(200, {"data": data, "status": status})
        else:
            handler.reply(status, data)


def collection(items: list) -> dict[str, Any]:
    return {"collection": items, "offset": 0, "perPage": len(items), "size": len(items), "totalPages": 1}


def expected_signature(method: str, content_type: str, date: str, path: str) -> str:
    token = "\n".join([method, "", content_type, date, path]).encode()
    return base64.b64encode(hmac.new(PRIVATE.encode(), token, hashlib.sha1).digest()).decode()


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    @property
    def st(self) -> FakeCytomine:
        return self.server.state

    def reply(self, code: int, body: Any = None, raw: bytes | None = None, headers: dict | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def forbidden(self, message: str) -> None:
        self.reply(403, {"success": False, "errors": message, "message": message})

    def authorised(self) -> bool:
        self.st.requests.append((self.command, urlsplit(self.path).path))
        auth = self.headers.get("authorization", "")
        m = re.fullmatch(r"CYTOMINE ([^:]+):(.+)", auth)
        date = self.headers.get("date", "")
        ok = bool(m and date and m.group(1) == PUBLIC and hmac.compare_digest(
            m.group(2), expected_signature(self.command, self.headers.get("content-type", ""), date, self.path)))
        if not ok:
            self.st.auth_failures += 1
            self.reply(401, {"errors": "Bad authentication"})
        return ok

    def body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except AssertionError as e:  # a protocol check failed: tell the client and the test
            self.st.protocol_errors.append(f"{self.command} {self.path}: {e!r}")
            self.reply(400, {"errors": f"protocol check failed: {e!r}"})
        except (BrokenPipeError, ConnectionResetError):  # a client that read the headers only
            pass

    def do_GET(self) -> None:
        p = urlsplit(self.path).path
        if m := re.fullmatch(r"/ims/download/(\d+)", p):  # the image server, behind the redirect
            data = self.st.slide.read_bytes() if int(m.group(1)) == GOOD else b"this is not a slide"
            self.st.image_bytes_served += len(data)
            return self.reply(200, raw=data)
        if not self.authorised():
            return
        st = self.st
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if p == "/api/user/current.json":
            if st.core == "spring":  # no user jobs there: keys are a person's
                return self.reply(200, {"id": 77, "class": "be.cytomine.domain.security.User", "username": "alice"})
            return self.reply(200, {"id": 77, "class": "be.cytomine.security.UserJob", "username": "job7",
                                    "algo": True, "job": JOB_ID, "publicKey": PUBLIC})
        if p == f"/api/job/{JOB_ID}.json" and st.core == "grails":
            return self.reply(200, st.job)
        if p == f"/api/project/{PROJECT}.json":
            return self.reply(200, {"id": PROJECT, "class": "be.cytomine.project.Project", "name": "demo",
                                    "ontology": ONTOLOGY, "areImagesDownloadable": st.downloadable})
        if p == f"/api/ontology/{ONTOLOGY}/term.json":
            return self.reply(200, collection(st.terms))
        if m := re.fullmatch(r"/api/imageinstance/(\d+)\.json", p):
            return self.reply(200, st.image(int(m.group(1))))
        if m := re.fullmatch(r"/api/imageinstance/(\d+)/download", p):
            if not (st.downloadable or st.manager):
                return self.forbidden("You don't have the right to read or modify this resource!")
            return self.reply(302, {}, headers={"location": f"/ims/download/{m.group(1)}"})
        if m := re.fullmatch(r"/api/annotation/(\d+)\.json", p):
            return self.reply(200, st.annotations[int(m.group(1))])
        if p == "/api/annotation.json":
            image, term = int(q["image"]), int(q.get("term", -1))
            hits = [st.roi_for()] if (image == GOOD and term == ROI_TERM and q.get("showWKT") == "true") else []
            return self.reply(200, collection(hits))
        self.reply(404, {"errors": {"message": f"no route {p}"}})

    def do_PUT(self) -> None:
        if not self.authorised():
            return
        st = self.st
        if self.path == f"/api/job/{JOB_ID}.json" and st.core == "grails":
            body = self.body()
            st.job.update({k: body[k] for k in ("status", "progress", "statusComment") if k in body})
            st.job_updates.append(dict(st.job))
            return self.reply(200, {"job": st.job, "message": "Job updated", "printMessage": True})
        self.reply(404, {"errors": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self.authorised():
            return
        st = self.st
        url = urlsplit(self.path)
        p = url.path
        if p == "/api/term.json":
            body = self.body()
            if not st.ontology_writable:
                return self.forbidden("You don't have the right to read or modify this resource!")
            term = {"id": st.new_id(), "class": "be.cytomine.ontology.Term", **body}
            st.terms.append(term)
            return self.reply(200, {"term": term, "message": "Term added"})
        if p == "/api/annotation.json":
            body = self.body()
            items = body if isinstance(body, list) else [body]
            ids, errors = [], []
            for item in items:
                geom = shapely.from_wkt(item["location"])
                assert item["image"] == GOOD and geom.is_valid
                assert all(t in {x["id"] for x in st.terms} for t in item["term"]), item["term"]
                if st.refuse(item):
                    errors.append({"data": item, "message": "refused by the test"})
                    continue
                ann = {"id": st.new_id(), "class": ALGO, **item}
                st.annotations[ann["id"]] = ann
                ids.append(ann["id"])
            if isinstance(body, list):
                return st.bulk(self, "algoannotation", ids, errors)
            return self.reply(200, {"annotation": st.annotations[ids[0]], "message": "Annotation added"})
        if re.fullmatch(r"/api/annotation/(\d+)/property\.json", p):
            if st.core == "spring":  # mapped for GET only
                return self.reply(405, {"error": "Method Not Allowed", "status": 405})
            raise AssertionError("the job must post properties to the domain route every core has")
        if m := re.fullmatch(r"/api/domain/([\w.]+)/(\d+)/property\.json", p):
            body = self.body()
            items = body if isinstance(body, list) else [body]
            assert int(m.group(2)) in st.annotations and m.group(1) == ALGO
            ids = []
            for item in items:
                assert set(item) == {"domainClassName", "domainIdent", "key", "value"}, item
                assert item["domainClassName"] == st.annotations[item["domainIdent"]]["class"]
                st.properties.setdefault(item["domainIdent"], {})[item["key"]] = item["value"]
                ids.append(st.new_id())
            return st.bulk(self, "property", ids, [])
        if p == "/api/attachedfile.json":
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                b"content-type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + raw)
            part = next(iter(msg.iter_parts()))
            assert part.get_param("name", header="content-disposition") == "files[]"
            st.attached.append((part.get_filename(), q["domainClassName"], int(q["domainIdent"])))
            return self.reply(200, {"id": st.new_id(), "class": "be.cytomine.meta.AttachedFile",
                                    "filename": part.get_filename(), "domainIdent": int(q["domainIdent"])})
        self.reply(404, {"errors": {"message": f"no route {p}"}})


@pytest.fixture()
def server(request):
    """A fake core on loopback: Grails unless the test asks for "spring" (indirect parameter)."""
    state = FakeCytomine(data_file("wsi/aperio/CMU-1-Small-Region.svs"), getattr(request, "param", "grails"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
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


def posts(state: FakeCytomine, pattern: str) -> int:
    return sum(1 for method, path in state.requests if method == "POST" and re.fullmatch(pattern, path))


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
    # Posted in arrays: one request per 100 annotations and per 1000 properties, not one per
    # property per tile.
    n_props = sum(len(p) for p in state.properties.values())
    assert n_props == sum(len(o.measurements) for o in regions + tiles)
    assert posts(state, r"/api/annotation\.json") == math.ceil(len(state.annotations) / 100)
    assert posts(state, r"/api/domain/.*/property\.json") == math.ceil(n_props / 1000)

    # Tiles are kept when their centre is in the ROI: as Cytomine draws it (bottom-left frame),
    # not where an unflipped ROI would put them.
    roi_cytomine = shapely.from_wkt(state.roi_for()["location"])
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
    qc_terms = {t["name"] for t in state.terms if t["name"].startswith("QC: ")}  # prepared with the classes
    qc_found = {r.class_name for r in regions} - {r.class_name for r in class_regions}
    assert qc_found and qc_found <= qc_terms == {"QC: " + k for k in ARTEFACTS}  # each region under its term above
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


def test_contributor_job_without_download_right_stops_before_any_work(server, models, tmp_path) -> None:
    """A contributor's job on a project that does not allow downloads: one line naming the setting,
    the job FAILED, and no image fetched, analysed or uploaded."""
    state, host = server
    state.manager = False
    res = CliRunner().invoke(cli, job_argv(host, f"{GOOD},{BROKEN}", models, tmp_path))
    assert res.exit_code != 0
    message = str(res.exception)
    assert "\n" not in message and "may not download image 11" in message and "'Allow images download' is off" in message
    assert state.job_updates[-1]["status"] == 4 and "Allow images download" in state.job_updates[-1]["statusComment"]
    assert state.image_bytes_served == 0 and not state.annotations and not list(tmp_path.iterdir())
    state.downloadable = True  # the setting on: a contributor may download
    assert CytomineClient(host, PUBLIC, PRIVATE).download_status(GOOD) == 302


def test_missing_term_without_ontology_rights_stops_before_any_work(server, models, tmp_path) -> None:
    """The model's 'Stroma' has no term and the job may not add one: one line before any image."""
    state, host = server
    state.ontology_writable = False
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path))
    assert res.exit_code != 0
    message = str(res.exception)
    assert "\n" not in message and "may not add the term(s) 'Stroma'" in message and "--term_mapping" in message
    assert state.image_bytes_served == 0 and not state.annotations
    # Mapping the class to an existing term needs no right at all; an id outside the ontology is refused.
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path, "--term_mapping", "Stroma=99"))
    assert res.exit_code != 0 and "not in the project's ontology 5" in str(res.exception)
    assert state.image_bytes_served == 0


def test_partial_bulk_answer_keeps_properties_on_what_was_created(server, models, tmp_path) -> None:
    """A 206 to a posted array: the created annotations still get their own properties, the image is
    reported failed with the server's reason, and nothing is attributed to the wrong polygon."""
    state, host = server
    state.refuse = lambda item: shapely.from_wkt(item["location"]).centroid.x > 900
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path, "--upload", "tiles"))
    assert res.exit_code != 0 and not state.protocol_errors
    final = state.job_updates[-1]
    assert final["status"] == 4 and "refused" in final["statusComment"] and "refused by the test" in final["statusComment"]
    tiles = read_objects(tmp_path / str(GOOD) / "out" / "tiles.geojson")
    kept = [t for t in tiles if t.geometry.centroid.x <= 900]
    assert 0 < len(kept) < len(tiles) and len(state.annotations) == len(kept)
    placed = [shapely.transform(t.geometry, lambda xy: xy * (1, -1) + (0, HEIGHT)) for t in kept]
    for ann in state.annotations.values():
        c = shapely.from_wkt(ann["location"]).centroid
        (tile,) = [t for t, g in zip(kept, placed) if g.contains(c)]
        props = state.properties[ann["id"]]
        assert props["prob: Tumor"] == f"{tile.measurements['prob: Tumor']:.6g}"
        assert props.keys() == tile.measurements.keys()


def test_image_shown_at_another_size_is_scaled_and_another_shape_refused(server, models, tmp_path) -> None:
    """Cytomine's image at twice the file's size: the ROI and the uploaded polygons are scaled
    between the two. Another aspect ratio cannot be the same picture: refused, nothing uploaded."""
    state, host = server
    state.size = (2 * WIDTH, 2 * HEIGHT)
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path))
    assert res.exit_code == 0, res.output
    regions = read_objects(tmp_path / str(GOOD) / "out" / "annotations.geojson")
    assert regions and len(state.annotations) == len(regions)
    got = shapely.union_all([shapely.from_wkt(a["location"]) for a in state.annotations.values()])
    want = shapely.union_all([shapely.transform(r.geometry, lambda xy: xy * (2, -2) + (0, 2 * HEIGHT))
                              for r in regions])
    assert got.symmetric_difference(want).area < 1e-3 * want.area
    tiles = read_objects(tmp_path / str(GOOD) / "out" / "tiles.geojson")
    assert all(ROI_TOP_LEFT.buffer(1).contains(t.geometry.centroid) for t in tiles)  # the ROI, scaled back

    state.annotations.clear()
    state.size = (WIDTH, 2 * HEIGHT)
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path / "again"))
    assert res.exit_code != 0 and not state.annotations
    comment = state.job_updates[-1]["statusComment"]
    assert "2220x2967 px" in comment and "2220x5934 px" in comment and "wrong place" in comment


@pytest.mark.parametrize("server", ["spring"], indirect=True)
def test_spring_core_has_no_jobs_and_takes_properties_on_the_domain_route(server, models, tmp_path) -> None:
    state, host = server
    res = CliRunner().invoke(cli, job_argv(host, str(GOOD), models, tmp_path))
    assert res.exit_code != 0 and "App Engine" in str(res.exception) and "\n" not in str(res.exception)
    assert state.image_bytes_served == 0

    client = CytomineClient(host, PUBLIC, PRIVATE)
    box = shapely.box(0, 0, 10, 10)
    state.refuse = lambda item: shapely.from_wkt(item["location"]).bounds[0] >= 100
    items = [{"location": shapely.affinity.translate(box, 50 * i).wkt, "image": GOOD, "term": [50]} for i in range(4)]
    outcome = client.add_annotations(items)  # the 206 travels inside an HTTP 200 here
    assert outcome.status == 206 and not outcome.complete and len(outcome.ids) == 2
    assert outcome.errors == ["refused by the test", "refused by the test"]
    props = client.add_properties(ALGO, [(outcome.ids[0], "a", "1"), (outcome.ids[1], "b", "2")])
    assert props.complete and state.properties == {outcome.ids[0]: {"a": "1"}, outcome.ids[1]: {"b": "2"}}
    with pytest.raises(CytomineError, match="HTTP 405") as e:  # the old route, refused by this core
        client.post(f"annotation/{outcome.ids[0]}/property.json", {"key": "a", "value": "1"})
    assert e.value.status == 405
    state.refuse = lambda item: True
    assert client.add_annotations(items[:1]).status == 400


def test_client_reports_server_errors_and_bad_keys(server) -> None:
    state, host = server
    with pytest.raises(CytomineError, match="HTTP 404: no route /api/nothing.json"):
        CytomineClient(host, PUBLIC, PRIVATE).get("nothing.json")
    with pytest.raises(CytomineError, match="HTTP 401: Bad authentication"):
        CytomineClient(host, PUBLIC, "wrong-private-key").current_user()
    assert state.auth_failures == 1
    with pytest.raises(CytomineError, match="cannot reach the server"):
        CytomineClient("http://127.0.0.1:9", PUBLIC, PRIVATE, timeout=2).current_user()
