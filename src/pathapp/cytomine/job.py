"""The legacy Cytomine job (descriptor.json, Cytomine-ULiège software router): the router starts
the container with the user job's keys; we report status to the server, analyse each selected
image, and upload class regions and/or tiles as annotations with their measurements as properties.

Only the Grails cores (<= 3.x) have the software router and its job endpoints; the Spring cores
(Cytomine CE 2023+) run apps through the App Engine (`task.py`, descriptor.yml) instead.

Job status codes are Cytomine's `Job` model: RUNNING = 2, TERMINATED (success) = 3, FAILED = 4;
`statusComment` holds at most 255 characters. The rights the job needs are checked before any
image is analysed (downloading the images, creating missing ontology terms), each failing check
stopping the job with one line. A failing image is recorded and the job goes on with the next one;
the job ends FAILED, naming the images that failed, if any did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely

from pathapp.cytomine.analyse import analyse_slide, load_runtime
from pathapp.cytomine.client import BulkOutcome, CytomineClient, CytomineError
from pathapp.cytomine.wkt import NO_SCALE, Scale, from_cytomine_wkt, scale_to_cytomine, to_cytomine_wkt
from pathapp.errors import PathappError, one_line

log = logging.getLogger(__name__)

RUNNING, TERMINATED, FAILED = 2, 3, 4
COMMENT_MAX = 255
UPLOAD_CHOICES = ("regions", "tiles", "both")
ANNOTATION_CHUNK = 100  # annotations per POSTed JSON array
PROPERTY_CHUNK = 1000  # properties per POSTed JSON array (about ten per tile)


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


@dataclass
class Upload:
    """Annotations created for one image, and what the server refused (annotations or properties)."""

    created: int = 0
    refused: list[str] = field(default_factory=list)


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
            "launch this app from the project's Analysis page of a Cytomine with the software router (core <= 3.x); "
            "on Cytomine CE 2023+ install descriptor.yml as an App Engine task instead"
        )
    try:
        job = client.job(int(user["job"]))
    except CytomineError as e:
        if e.status != 404:
            raise
        raise PathappError(f"{client.base_url}: this Cytomine has no job {user['job']} (no software router: "
                           "Cytomine CE 2023+); install descriptor.yml as an App Engine task instead") from None
    return JobStatus(client, job)


def run_job(params: JobParams, client: CytomineClient | None = None) -> JobOutcome:
    """Run the whole job; the server's job ends TERMINATED or FAILED whatever happens here."""
    client = client or CytomineClient(params.host, params.public_key, params.private_key)
    status = connect_job(client)
    status.update(RUNNING, 0, "Checking rights and loading the model")
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
    project = client.project(params.project_id)
    check_download_right(client, project, params.image_ids)
    runtime = load_runtime(params.model, params.models_dir, params.device)
    terms = TermResolver(client, project.get("ontology"), params.term_mapping)
    terms.prepare(runtime.bundle.class_names, runtime.bundle.class_colors)
    terms.prepare_qc()
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


def check_download_right(client: CytomineClient, project: dict[str, Any], image_ids: list[int]) -> None:
    """Stop before any work when the job may not download the images.

    `imageinstance/{id}/download` answers 403 unless the project allows downloads (its
    `areImagesDownloadable`, off by default) or the user manages the project (Cytomine-core
    `RestImageInstanceController.download`: `checkIsAdminContainer`), so a contributor's job would
    fail on every image. The check asks the server itself, reading only the answer's headers."""
    for image_id in image_ids:
        if client.download_status(image_id) == 403:
            setting = "off" if not project.get("areImagesDownloadable") else "on"
            raise PathappError(
                f"project {project.get('id')} ({project.get('name', '?')}): the job may not download image "
                f"{image_id} (HTTP 403; 'Allow images download' is {setting} and the job's user does not "
                "manage the project); turn that setting on in the project's configuration, or have a "
                "project manager run the job"
            )


def _one_image(params: JobParams, client: CytomineClient, status: JobStatus, runtime: Any,
               terms: TermResolver, image_id: int) -> int:
    """Download, analyse and upload one image; returns the number of annotations created."""
    from pathapp.slide import open_slide

    info = client.image_instance(image_id)
    height = int(info["height"])
    folder = params.work_dir / str(image_id)
    name = Path(str(info.get("originalFilename") or info.get("instanceFilename") or image_id)).name
    path = client.download_image(image_id, folder / name)
    slide = open_slide(path)
    try:
        scale = scale_to_cytomine(slide.size, (int(info["width"]), height), f"image {image_id} ({name})")
        server_mpp = info.get("physicalSizeX") or info.get("resolution")
        if slide.file_mpp is None and server_mpp:  # Cytomine's µm/px is per Cytomine px
            slide.calibrate(float(server_mpp) * scale[0])
        rois = _rois(client, image_id, params.roi_term, height, scale) if params.roi_term else None
        result, _ = analyse_slide(slide, runtime, folder / "out", mpp=params.mpp, tile_size=params.tile_size,
                                  rois=rois, batch_size=params.batch_size, min_prob=params.min_prob)
    finally:
        slide.close()
    out = folder / "out"
    upload = _upload(client, terms, image_id, height, scale, out, params.upload)
    job_class = status.job.get("class", "be.cytomine.processing.Job")
    for f in (out / "run.json", out / "overlay.png"):
        if f.is_file():
            client.attach_file(f, job_class, status.job["id"], name=f"{image_id}-{f.name}")
    log.info("image %s: %d tiles, %d annotations uploaded", image_id, len(result), upload.created)
    if upload.refused:
        raise CytomineError(f"the server refused part of the upload ({upload.created} annotation(s) created): "
                            + "; ".join(upload.refused))
    return upload.created


def _upload(client: CytomineClient, terms: TermResolver, image_id: int, height: int, scale: Scale, out: Path,
            upload: str) -> Upload:
    """Post the written regions and/or tiles as annotations (JSON arrays), then their measurements
    as properties (JSON arrays)."""
    from pathapp.qupath.geojson import read_objects

    objects = []
    if upload in ("regions", "both"):
        objects += read_objects(out / "annotations.geojson")
    if upload in ("tiles", "both"):
        objects += read_objects(out / "tiles.geojson")
    done = Upload()
    properties: list[tuple[int, str, str]] = []
    domain_class = None
    for start in range(0, len(objects), ANNOTATION_CHUNK):
        chunk = objects[start : start + ANNOTATION_CHUNK]
        items = [{"location": to_cytomine_wkt(o.geometry, height, scale=scale), "image": image_id,
                  "term": terms.ids(o.class_name)} for o in chunk]
        outcome = client.add_annotations(items)
        pairs = list(zip(outcome.ids, range(len(items)))) if outcome.complete else \
            match_created(client, outcome.ids, items)
        _note_refusals(done, outcome, "annotations", len(items))
        if pairs and domain_class is None:  # AlgoAnnotation for a job's user: ask, not assume
            domain_class = str(client.annotation(pairs[0][0])["class"])
        properties += [(ann_id, key, f"{value:.6g}") for ann_id, k in pairs
                       for key, value in chunk[k].measurements.items()]
        done.created += len(pairs)
    for start in range(0, len(properties), PROPERTY_CHUNK):
        part = properties[start : start + PROPERTY_CHUNK]
        _note_refusals(done, client.add_properties(str(domain_class), part), "properties", len(part))
    return done


def _note_refusals(done: Upload, outcome: BulkOutcome, what: str, sent: int) -> None:
    if not outcome.complete:
        why = outcome.errors[0] if outcome.errors else outcome.message
        done.refused.append(f"{sent - len(outcome.ids)} of {sent} {what} refused ({why})")


def match_created(client: CytomineClient, ids: list[int], items: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(annotation id, item index) after a partial (206) answer: the server lists the ids it
    created, but not which items those were (its `errors` need not name every refused item), so
    each created annotation is read back and matched to the item nearest its location."""
    if not ids:
        return []
    sent = shapely.from_wkt([it["location"] for it in items])
    tree = shapely.STRtree(sent)
    pairs = []
    for ann_id in ids:
        got = shapely.from_wkt(client.annotation(ann_id)["location"])
        pairs.append((ann_id, int(tree.nearest(got.representative_point()))))
    return pairs


def _rois(client: CytomineClient, image_id: int, term_id: int, height: int, scale: Scale = NO_SCALE) -> Any:
    """The union of the image's annotations of the ROI term, in the file's top-left level-0 px."""
    anns = client.annotations(image_id, term_id)
    geoms = [from_cytomine_wkt(a["location"], height, scale) for a in anns if a.get("location")]
    if not geoms:
        raise PathappError(f"image {image_id} has no annotation with the ROI term {term_id}; "
                           "draw one or leave the ROI term empty")
    return shapely.union_all(geoms)


class TermResolver:
    """Class name -> ontology term id: the user's mapping first, then a term of the same name in
    the project's ontology, else a new term created with the class colour. `prepare` settles every
    class before any image is analysed, so a missing right stops the job before the work."""

    def __init__(self, client: CytomineClient, ontology_id: int | None, mapping: dict[str, int]) -> None:
        self.client, self.ontology_id = client, ontology_id
        self.mapping = dict(mapping)  # the user's --term_mapping
        self.by_name: dict[str, int] = dict(mapping)
        self.qc_without_terms = False  # the job may not add QC terms: QC regions go up without one
        self.existing = {t["name"]: int(t["id"]) for t in client.ontology_terms(ontology_id)} if ontology_id else {}

    def prepare(self, names: list[str], colors: list[tuple[int, int, int]]) -> None:
        """Find or create the term of every class the model can output.

        Creating a term needs write rights on the ontology (Cytomine-core `TermService.add`:
        `securityACLService.check(json.ontology, Ontology, WRITE)`), which a contributor's job lacks."""
        unknown = sorted(n for n, t in self.mapping.items() if self.existing and t not in self.existing.values())
        if unknown:
            raise PathappError(f"--term_mapping: the term ids of {', '.join(unknown)} are not in the project's "
                               f"ontology {self.ontology_id}; use ids from that ontology")
        missing = [(n, c) for n, c in zip(names, colors) if n not in self.by_name and n not in self.existing]
        if missing and not self.ontology_id:
            raise PathappError(f"project has no ontology to hold the classes {', '.join(n for n, _ in missing)}: "
                               "attach an ontology to the project or pass --term_mapping")
        for name, (r, g, b) in missing:
            try:
                term = self.client.create_term(name, f"#{r:02x}{g:02x}{b:02x}", int(self.ontology_id))  # type: ignore[arg-type]
            except CytomineError as e:
                if e.status != 403:
                    raise
                raise PathappError(
                    f"ontology {self.ontology_id}: the job may not add the term(s) "
                    f"{', '.join(repr(n) for n, _ in missing)} (HTTP 403: creating terms needs write rights on the "
                    "ontology); ask its owner to add them, or map the classes to existing terms with --term_mapping"
                ) from None
            self.by_name[name] = int(term["id"])
        self.by_name.update({n: t for n, t in self.existing.items() if n in names and n not in self.by_name})

    def prepare_qc(self) -> None:
        """Terms for the QC artefact regions (`QC: blur`, …) where the job may have them; where it may
        not, those regions go up without a term (the model's classes are what the job must label)."""
        from pathapp.results.geojson import QC_CLASS
        from pathapp.tiles.qc import ARTEFACTS

        try:
            self.prepare([QC_CLASS + k for k in ARTEFACTS], list(ARTEFACTS.values()))
        except PathappError as e:
            log.warning("QC regions are uploaded without a term: %s", e)
            self.qc_without_terms = True

    def ids(self, class_name: str | None) -> list[int]:
        from pathapp.results.geojson import QC_CLASS

        if not class_name or (self.qc_without_terms and class_name.startswith(QC_CLASS) and class_name not in self.by_name):
            return []
        if class_name not in self.by_name:
            raise PathappError(f"class {class_name!r} is not among the model's classes the job prepared terms for")
        return [self.by_name[class_name]]
