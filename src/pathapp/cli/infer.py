"""`pathapp infer`: run a model over slides, folders of slides, or a QuPath project."""

from __future__ import annotations

import sys

import click

from pathapp.cli.options import BATCH_SIZE, FRACTION, WORKERS, qc_option, slide_run_options, stain_options
from pathapp.models.loader import DEFAULT_MODEL


@click.command(context_settings={"max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, type=str, metavar="INPUT...")
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True, metavar="BUNDLE|NAME",
              help="A .pathapp bundle (classes, head, preprocessing), or a backbone name (see `pathapp "
              "model list`) for embeddings only, with weights from --weights or the hub.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights file for a backbone NAME: official DINOv2 .pth, timm .pth/.safetensors.")
@slide_run_options
@click.option("--roi", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuPath GeoJSON export of annotations; only tiles whose centre lies inside are run.")
@click.option("--roi-class", multiple=True, metavar="NAME",
              help="Use only annotations of this class (repeatable; Unclassified for those without "
              "one): of --roi, or without --roi each QuPath project image's own annotations.")
@click.option("--min-tissue", type=FRACTION, default=None,
              help="Tissue fraction a tile needs to be analysed (default 0.1).")
@click.option("--batch-size", type=BATCH_SIZE, default=32, show_default=True)
@click.option("--workers", type=WORKERS, default=None,
              help="Tile-reading processes (default: chosen from the CPU count; 0 = read in the main process).")
@click.option("--device", default="auto", show_default=True,
              help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
              help="auto: bf16 on GPUs and on CPUs with AVX-512-BF16/AMX (2-3x faster, embedding cosine > 0.999 "
              "to fp32), else fp32. int8: dynamic int8 Linear layers on CPU (cosine ≥ 0.99; faster than fp32 "
              "only on CPUs without bf16).")
@click.option("--object-type", type=click.Choice(["tile", "detection"]), default="tile", show_default=True,
              help="QuPath object type of the per-tile objects in tiles.geojson.")
@click.option("--overwrite", is_flag=True,
              help="Replace complete results: needed when they were made with other settings (model, --mpp, "
              "--roi, ...; a rerun names what differs). Replaces all of pathapp's own files there and only those.")
@click.option("--dicom-out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also write DICOM results for DICOM-WSI slides into DIR/<slide name>/: annotations.ann.dcm "
              "(tiles per class with probabilities) and probabilities.seg.dcm (a fractional segmentation).")
@click.option("--dicomweb-store", is_flag=False, flag_value="", default=None, metavar="[URL]",
              help="Store the DICOM results with STOW-RS: alone, to the DICOMweb server the slide came from; "
              "with a URL (the server's DICOMweb root), there. Credentials as for reading.")
@click.option("--lease-seconds", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Processes sharing an --out claim slides one at a time; a slide whose process shows no "
              "sign of life this long is taken over by another (on one host: as soon as it is gone).")
@qc_option
@stain_options
@click.option("--write-project", is_flag=True,
              help="For a .qpproj input, also add the objects to the QuPath project (needs paquo and "
              "QuPath; otherwise prints how to import the GeoJSON).")
def infer(inputs: tuple[str, ...], model: str, weights: str | None, out: str | None, mpp: float | None,
          tile_size: int | None, roi: str | None, roi_class: tuple[str, ...], slide_mpp: float | None,
          min_tissue: float | None, batch_size: int, workers: int | None, device: str, precision: str,
          object_type: str, qc: str, stain_norm: str | None, stain_ref: str | None, overwrite: bool,
          lease_seconds: float, dicom_out: str | None, dicomweb_store: str | None,
          write_project: bool) -> None:
    """Run MODEL over every slide in INPUT... and write QuPath-ready results.

    INPUT is a slide file, a folder of slides (a DICOM-WSI series folder counts as one slide), a
    QuPath project (project.qpproj or its folder), a DICOMweb address
    (dicomweb+https://host/<root>/studies/<UID>[/series/<UID>]; a study means each of its slides;
    credentials from PATHAPP_DICOMWEB_TOKEN or PATHAPP_DICOMWEB_USER/PASSWORD), or a .txt worklist
    with one of these per line. Each slide gets a folder with tiles.geojson and annotations.geojson
    (drag them onto the image in QuPath), heatmap-<class>.png, overlay.png, embeddings.h5 (CLAM/TRIDENT
    layout) and run.json. A rerun skips slides that are complete with the same settings and refuses,
    in one line, to replace results of other settings without --overwrite; a slide that fails is
    reported and the others still run (exit code 1 if any failed).

    \b
    Examples:
      pathapp infer slide.svs                                   (DINOv2 ViT-S/14 embeddings, PCA map)
      pathapp infer slide.svs --model tumor.pathapp
      pathapp infer slides/ --model dinov2_vits14 --weights dinov2_vits14_pretrain.pth --mpp 0.5
      pathapp infer project.qpproj --model tumor.pathapp --roi-class Tumor   (inside each image's Tumor annotations)
      pathapp infer slide.svs --model tumor.pathapp --roi rois.geojson --roi-class Tumor
      pathapp infer slides/ --model tumor.pathapp --qc exclude --stain-norm macenko --stain-ref ref.png
      torchrun --nproc-per-node 4 -m pathapp infer slides/ --model tumor.pathapp   (one GPU per rank)
      sbatch --array=0-15 --wrap "pathapp infer slides/ --model tumor.pathapp --out results/"
                                    (16 tasks share the slides: each claims the next unfinished one)
      pathapp infer dicomweb+https://pacs.example.org/dicom-web/studies/1.2.3 --model tumor.pathapp \\
          --out results/ --dicom-out dicom/ --dicomweb-store         (results back to the archive)
      pathapp infer worklist.txt --model tumor.pathapp --out results/
    """
    from pathapp.infer import InferOptions, run_inference

    options = InferOptions(
        model=model, weights=weights, out=out, mpp=mpp, tile_size=tile_size, roi=roi, roi_class=roi_class,
        slide_mpp=slide_mpp, min_tissue=min_tissue, batch_size=batch_size, workers=workers, device=device,
        precision=precision, object_type=object_type, overwrite=overwrite, write_project=write_project, qc=qc,
        stain_norm=stain_norm, stain_ref=stain_ref, dicom_out=dicom_out, dicomweb_store=dicomweb_store,
        lease_seconds=lease_seconds)
    summary = run_inference(list(inputs), options)
    click.echo("infer: " + summary.line(), err=True)
    if not summary.ok:
        sys.exit(1)
