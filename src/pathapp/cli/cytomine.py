"""`pathapp cytomine job|task`: the container's two Cytomine entry points (thin wrappers)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import click

from pathapp.cli.options import BATCH_SIZE, FRACTION, MAX_MPP, MAX_TILE_SIZE, FiniteRange
from pathapp.cytomine.analyse import DEFAULT_MODELS_DIR, MODELS_ENV


@click.group()
def cytomine() -> None:
    """Run as a Cytomine app (inside the container, started by Cytomine).

    \b
    job     legacy Cytomine (descriptor.json): talks to the server's REST API, uploads annotations
    task    Cytomine App Engine (descriptor.yml): reads /inputs, writes /outputs, no network
    bundle  pack descriptor.yml and the saved image into the zip the App Engine installs
    """


class RouterCommand(click.Command):
    """The Cytomine router replaces each value key by `--flag value` in a shell command line, so an
    optional input left empty arrives as a bare `--flag` that would swallow the next flag as its
    value. A bare value-taking flag is dropped here, and its default applies."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
        kept = [a for i, a in enumerate(args)
                if not (a in takes_value and (i + 1 == len(args) or args[i + 1] in takes_value))]
        return super().parse_args(ctx, kept)


models_dir_option = click.option(
    "--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None, envvar=MODELS_ENV,
    help=f"Folder of model bundles that a model name refers to [default: ${MODELS_ENV} or {DEFAULT_MODELS_DIR}].",
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


@cytomine.command("job", cls=RouterCommand)
@click.option("--cytomine_host", required=True, help="Server URL (set by the server).")
@click.option("--cytomine_public_key", required=True, help="The job's public key (set by the server).")
@click.option("--cytomine_private_key", required=True, help="The job's private key (set by the server).")
@click.option("--cytomine_id_project", type=int, required=True, help="Project id (set by the server).")
@click.option("--cytomine_id_software", type=int, required=True, help="Software id (set by the server).")
@click.option("--cytomine_id_images", required=True, metavar="ID,ID,...", help="Image instance ids to analyse.")
@click.option("--cytomine_id_roi_term", default="", metavar="TERM_ID",
              help="Analyse only inside annotations of this term (empty: whole tissue).")
@click.option("--model", required=True, help="Bundle name in --models-dir (tumor -> tumor.pathapp) or a path.")
@click.option("--mpp", type=FiniteRange(0, MAX_MPP), default=0, show_default=True,
              help="Tile resolution in µm/px; 0 = the bundle's.")
@click.option("--tile_size", type=click.IntRange(0, MAX_TILE_SIZE), default=0, show_default=True,
              help="Model input px; 0 = the bundle's.")
@click.option("--batch_size", type=BATCH_SIZE, default=32, show_default=True)
@click.option("--upload", type=click.Choice(["regions", "tiles", "both"]), default="regions", show_default=True,
              help="Annotations to create: one region per class, one per tile, or both.")
@click.option("--min_prob", type=FRACTION, default=0, show_default=True,
              help="Drop tiles whose top probability is lower.")
@click.option("--term_mapping", default="", metavar="CLASS=ID,...",
              help="Map classes to existing term ids; others use (or create) the term of the same name.")
@models_dir_option
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where images are downloaded and results written [default: a temporary folder].")
@device_option
def job(cytomine_host: str, cytomine_public_key: str, cytomine_private_key: str, cytomine_id_project: int,
        cytomine_id_software: int, cytomine_id_images: str, cytomine_id_roi_term: str, model: str, mpp: float,
        tile_size: int, batch_size: int, upload: str, min_prob: float, term_mapping: str,
        models_dir: Path | None, work_dir: Path | None, device: str) -> None:
    """Legacy Cytomine job: analyse the selected images and upload annotations.

    Started by the Cytomine software router with the flags of descriptor.json. Reports progress
    to the job, uploads class regions (and/or tiles) in Cytomine's bottom-left coordinates with
    the measurements as properties, and attaches run.json and overlay.png to the job. A failing
    image does not stop the others; the job then ends FAILED, naming it.
    """
    from pathapp.cytomine.analyse import models_dir as resolve_models_dir
    from pathapp.cytomine.job import JobParams, parse_id_list, parse_optional_id, parse_term_mapping, run_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="pathapp-cytomine-") as tmp:
        params = JobParams(
            host=cytomine_host, public_key=cytomine_public_key, private_key=cytomine_private_key,
            project_id=cytomine_id_project, software_id=cytomine_id_software,
            image_ids=parse_id_list(cytomine_id_images), roi_term=parse_optional_id(cytomine_id_roi_term),
            model=model, models_dir=resolve_models_dir(models_dir), work_dir=work_dir or Path(tmp),
            mpp=mpp or None, tile_size=tile_size or None, batch_size=batch_size, upload=upload,
            min_prob=min_prob, term_mapping=parse_term_mapping(term_mapping), device=device,
        )
        outcome = run_job(params)
    click.echo(f"{sum(outcome.annotations.values())} annotation(s) on {len(outcome.annotations)} image(s)")
    if outcome.failed:
        raise click.ClickException(f"{len(outcome.failed)} image(s) failed: " +
                                   "; ".join(f"{i}: {m}" for i, m in outcome.failed.items()))


@cytomine.command("task")
@click.option("--inputs", "inputs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("/inputs"), show_default=True, help="App Engine input folder (one file per input).")
@click.option("--outputs", "outputs_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/outputs"), show_default=True, help="App Engine output folder.")
@models_dir_option
@device_option
def task(inputs_dir: Path, outputs_dir: Path, models_dir: Path | None, device: str) -> None:
    """Cytomine App Engine task: /inputs in, /outputs out (see descriptor.yml).

    \b
    The image runs this when started with no arguments, as the App Engine starts it.
    Inputs (files): image, optional model (bundle name; default: the bundle baked into the image),
    mpp, tile_size, min_prob.
    Outputs: class_names and class_regions (arrays; regions are GeoJSON geometries in Cytomine's
    bottom-left coordinates), annotations and tiles (QuPath GeoJSON files), run (run.json).
    """
    from pathapp.cytomine.analyse import models_dir as resolve_models_dir
    from pathapp.cytomine.task import run_task

    summary = run_task(inputs_dir, outputs_dir, resolve_models_dir(models_dir), device=device)
    click.echo(summary)


@cytomine.command("bundle")
@click.argument("image_tar", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--descriptor", "descriptor_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("descriptor.yml"), show_default=True, help="The task descriptor.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for <namespace>-<version>.zip.")
def bundle(image_tar: Path, descriptor_path: Path, out_dir: Path) -> None:
    """Make the App Engine task bundle from a `docker save` of the image.

    \b
    With descriptor.yml's namespace org.pathapp.dinov2.tiles and version 0.1.0:
      docker build --provenance=false --sbom=false --build-arg MODEL_BUNDLE=tumor.pathapp \\
          -t org/pathapp/dinov2/tiles:0.1.0 .
      docker save org/pathapp/dinov2/tiles:0.1.0 -o org.pathapp.dinov2.tiles-0.1.0.tar
      pathapp cytomine bundle org.pathapp.dinov2.tiles-0.1.0.tar
    then upload org.pathapp.dinov2.tiles-0.1.0.zip in Cytomine (App Engine: install task).
    """
    from pathapp.cytomine.bundle import write_task_bundle

    click.echo(f"wrote {write_task_bundle(descriptor_path, image_tar, out_dir)}")
