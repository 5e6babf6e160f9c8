"""The legacy Cytomine job (descriptor.json, Cytomine-ULiège software router): the router starts
the container with the user job's keys; we report status to the server, analyse each selected
image, and upload class regions and/or tiles as annotations with their measurements as properties.

Job status codes are Cytomine's `Job` model: RUNNING = 2, TERMINATED (success) = 3, FAILED = 4;
`statusComment` holds at most 255 characters. A failing image is recorded and the job goes on with
the next one; the job ends FAILED, naming the images that failed, if any did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely

from pathapp.cytomine.analyse import analyse_slide, load_runtime
from pathapp.cytomine.client import CytomineClient, CytomineError
from pathapp.cytomine.wkt import from_cytomine_wkt, to_cytomine_wkt
from pathapp.errors import PathappError, one_line

log = logging.getLogger(__name__)

RUNNING, TERMINATED, FAILED = 2, 3, 4
COMMENT_MAX = 255
UPLOAD_CHOICES = ("regions", "tiles", "both")
TILE_CHUNK = 100  # annotations per POST of a JSON array, as the Python client chunks them
# What the server makes of an annotation a job posts (its user is a UserJob).
ALGO_ANNOTATION = "be.cytomine.ontology.AlgoAnnotation"


@dataclass
class JobParams:
    """Everything the descriptor's command line passes (server-set and user inputs)."""

    host: str
    public_key: str
    private_key: str
    project_id: int
    software_id: int
    image_ids: list[int]
    model: str
    models_dir: Path
    work_dir: Path
    roi_term: int | None = None
    mpp: float | None = None
    tile_size: int | None = None
    batch_size: int = 32
    upload: str = "regions"
    min_prob: float = 0.0
    term_mapping: dict[str, int] = field(default_factory=dict)
    device: str = "auto"


@dataclass
class JobOutcome:
    """What happened: annotations created per image, and the reason each failed image failed."""

    annotations: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def parse_id_list(text: str) -> list[int]:
    """A ListDomain value ("12,34") as ids."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise PathappError(f"--cytomine_id_images {text!r}: expected comma-separated image ids such as 12,34") from None


def parse_optional_id(text: str | None) -> int | None:
    """An optional Domain value; the router may pass it empty or as 'null'."""
    if text is None or text.strip().lower() in {"", "null", "none"}:
        return None
    try:
        return int(text)
    except ValueError:
        raise PathappError(f"--cytomine_id_roi_term {text!r}: expected a term id (a number) or nothing") from None


def parse_term_mapping(text: str | None) -> dict[str, int]:
    """'Tumor=12,Stroma=34' -> {'Tumor': 12, 'Stroma': 34}: model classes to existing term ids."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, term = part.rpartition("=")
        if not sep or not name.strip() or not term.strip().isdigit():
            raise PathappError(f"--term_mapping {text!r}: expected CLASS=TERM_ID pairs separated by commas, "
                               "e.g. Tumor=12,Stroma=34")
        out[name.strip()] = int(term)
    return out


class JobStatus:
    """The job object on the server; every change is PUT back at once so the UI follows along."""

    def __init__(self, client: CytomineClient, job: dict[str, Any]) -> None:
        self.client, self.job = client, job

    def update(self, status: int | None = None, progress: float | None = None, comment: str | None = None) -> None:
        if status is not None:
            self.job["status"] = status
        if progress is not None:
            self.job["progress"] = max(0, min(100, int(progress)))
        if comment is not None:
            self.job["statusComment"] = comment[:COMMENT_MAX]
        self.job = self.client.update_job(self.job)


def connect_job(client: CytomineClient) -> JobStatus:
    """The job these keys belong to: the router runs us with a user job's keys, whose current user
    carries the job id (`algo`: true, `job`: id)."""
    user = client.current_user()
    if not user.get("algo") or not user.get("job"):
        raise PathappError(
            f"{client.base_url}: the keys given belong to user {user.get('username', '?')!r}, not to a job; "
            "launch this app from the Cytomine project's Analysis page so the server creates the job"
        )
    return JobStatus(client, client.job(int(user["job"])))


def run_job(params: JobParams, client: CytomineClient | None = None) -> JobOutcome:
    """Run the whole job; the server's job ends TERMINATED or FAILED whatever happens here."""
    client = client or CytomineClient(params.host, params.public_key, params.private_key)
    status = connect_job(client)
    status.update(RUNNING, 0, "Loading the model")
    try:
        outcome = _run(params, client, status)
    except BaseException as e:  # noqa: BLE001 - the server must learn the job died, whatever killed it
        try:
            status.update(FAILED, comment=f"Failed: {one_line(e)}")
        except CytomineError as report_error:  # keep the original error; say why the job shows no reason
            log.error("could not mark the job FAILED: %s", report_error)
        raise
    n = len(params.image_ids)
    if outcome.failed:
        details = "; ".join(f"image {i}: {msg}" for i, msg in outcome.failed.items())
        status.update(FAILED, 100, f"{len(outcome.failed)}/{n} image(s) failed: {details}")
    else:
        status.update(TERMINATED, 100, f"Done: {n} image(s), {sum(outcome.annotations.values())} annotation(s)")
    return outcome


def _run(params: JobParams, client: CytomineClient, status: JobStatus) -> JobOutcome:
    if params.upload not in UPLOAD_CHOICES:
        raise PathappError(f"--upload {params.upload!r}: choose one of {', '.join(UPLOAD_CHOICES)}")
    if not params.image_ids:
        raise PathappError("--cytomine_id_images is empty: select at least one image")
    runtime = load_runtime(params.model, params.models_dir, params.device)
    project = client.project(params.project_id)
    terms = TermResolver(client, project.get("ontology"), params.term_mapping)
    outcome = JobOutcome()
    n = len(params.image_ids)
    for k, image_id in enumerate(params.image_ids):
        status.update(progress=100 * k / n, comment=f"Image {k + 1}/{n} (id {image_id})")
        try:
            outcome.annotations[image_id] = _one_image(params, client, status, runtime, terms, image_id)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the others
            log.error("image %s failed: %s", image_id, one_line(e))
            outcome.failed[image_id] = one_line(e)
    return outcome


def _one_image(params: JobParams, client: CytomineClient, status: JobStatus, runtime: Any,
               terms: TermResolver, image_id: int) -> int:
    """Download, analyse and upload one image; returns the number of annotations created."""
    from pathapp.slide import open_slide

    info = client.image_instance(image_id)
    height = int(info["height"])
    folder = params.work_dir / str(image_id)
    name = Path(str(info.get("originalFilename") or info.get("instanceFilename") or image_id)).name
    path = client.download_image(image_id, folder / name)
    server_mpp = info.get("physicalSizeX") or info.get("resolution")
    slide = open_slide(path)
    if slide.file_mpp is None and server_mpp:
        slide.calibrate(float(server_mpp))
    try:
        rois = _rois(client, image_id, params.roi_term, height) if params.roi_term else None
        result, _ = analyse_slide(slide, runtime, folder / "out", mpp=params.mpp, tile_size=params.tile_size,
                                  rois=rois, batch_size=params.batch_size, min_prob=params.min_prob)
    finally:
        slide.close()
    out = folder / "out"
    created = _upload(client, terms, image_id, height, out, params.upload)
    job_class = status.job.get("class", "be.cytomine.processing.Job")
    for f in (out / "run.json", out / "overlay.png"):
        if f.is_file():
            client.attach_file(f, job_class, status.job["id"], name=f"{image_id}-{f.name}")
    log.info("image %s: %d tiles, %d annotations uploaded", image_id, len(result), created)
    return created


def _upload(client: CytomineClient, terms: TermResolver, image_id: int, height: int, out: Path, upload: str) -> int:
    """Post the written regions and/or tiles as annotations with their measurements as properties."""
    from pathapp.qupath.geojson import read_objects

    created = 0
    if upload in ("regions", "both"):
        for obj in read_objects(out / "annotations.geojson"):
            wkt = to_cytomine_wkt(obj.geometry, height)
            ann = client.add_annotation(wkt, image_id, terms.ids(obj.class_name, obj.color))
            _add_properties(client, ann.get("class", ALGO_ANNOTATION), ann["id"], obj.measurements)
            created += 1
    if upload in ("tiles", "both"):
        tiles = read_objects(out / "tiles.geojson")
        for start in range(0, len(tiles), TILE_CHUNK):
            chunk = tiles[start : start + TILE_CHUNK]
            ids = client.add_annotations([{"location": to_cytomine_wkt(t.geometry, height), "image": image_id,
                                           "term": terms.ids(t.class_name, t.color)} for t in chunk])
            for ann_id, t in zip(ids, chunk):
                _add_properties(client, ALGO_ANNOTATION, ann_id, t.measurements)
            created += len(ids)
    return created


def _add_properties(client: CytomineClient, domain_class: str, ann_id: int,
                    measurements: dict[str, float]) -> None:
    for key, value in measurements.items():
        client.add_property(domain_class, ann_id, key, f"{value:.6g}")


def _rois(client: CytomineClient, image_id: int, term_id: int, height: int) -> Any:
    """The union of the image's annotations of the ROI term, in top-left level-0 px."""
    anns = client.annotations(image_id, term_id)
    geoms = [from_cytomine_wkt(a["location"], height) for a in anns if a.get("location")]
    if not geoms:
        raise PathappError(f"image {image_id} has no annotation with the ROI term {term_id}; "
                           "draw one or leave the ROI term empty")
    return shapely.union_all(geoms)


class TermResolver:
    """Class name -> ontology term id: the user's mapping first, then a term of the same name in
    the project's ontology, else a new term created with the class colour."""

    def __init__(self, client: CytomineClient, ontology_id: int | None, mapping: dict[str, int]) -> None:
        self.client, self.ontology_id = client, ontology_id
        self.by_name: dict[str, int] = dict(mapping)
        self.existing = {t["name"]: int(t["id"]) for t in client.ontology_terms(ontology_id)} if ontology_id else {}

    def ids(self, class_name: str | None, color: tuple[int, int, int] | None = None) -> list[int]:
        if not class_name:
            return []
        if class_name not in self.by_name:
            if class_name in self.existing:
                self.by_name[class_name] = self.existing[class_name]
            elif self.ontology_id:
                from pathapp.qupath.geojson import class_color

                r, g, b = color or class_color(class_name)
                term = self.client.create_term(class_name, f"#{r:02x}{g:02x}{b:02x}", self.ontology_id)
                self.by_name[class_name] = int(term["id"])
            else:
                raise CytomineError(f"project has no ontology to hold the class {class_name!r}: attach an "
                                    "ontology to the project or pass --term_mapping")
        return [self.by_name[class_name]]
