"""Slides read over DICOMweb from a real Orthanc: the same pixels as the files, only the frames a read
needs, a study expanded to its slides, and one clear line for each way a server or address can fail."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import data_file
from orthanc_server import PASSWORD, free_port
from pathapp.errors import SlideOpenError
from pathapp.slide import expand_slide_inputs, open_slide


@pytest.fixture
def web_env(orthanc, monkeypatch):
    for key, value in orthanc.env.items():
        monkeypatch.setenv(key, value)
    return orthanc


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PATHAPP_DICOMWEB")} | env
    return subprocess.run([sys.executable, "-m", "pathapp", *args], capture_output=True, text=True, timeout=180,
                          env=full)


def test_series_over_dicomweb_reads_the_same_pixels_as_its_files(web_env) -> None:
    folder = data_file("dicom/cmu-1-small-region-wsi2dcm")
    with open_slide(web_env.url("cmu1")) as web, open_slide(folder) as disk:
        assert web.backend == "dicomweb" and web.name == web_env.series["cmu1"][1]
        assert (web.size, web.levels, web.mpp) == (disk.size, disk.levels, disk.mpp)
        for level, (x, y) in enumerate([(700, 900), (1000, 1400), (400, 800)]):
            np.testing.assert_array_equal(web.read(x, y, 300, 200, level), disk.read(x, y, 300, 200, level))
        headers = web.dicom_headers()
        assert [h.SOPInstanceUID for h in headers] == [h.SOPInstanceUID for h in disk.dicom_headers()]
        assert all("PixelData" not in h for h in headers)


def test_lossless_series_over_dicomweb_equals_the_source_image_exactly(web_env) -> None:
    truth = np.asarray(Image.open(data_file("dicom/wsi2dcm-bone/bone.jpeg")).convert("RGB"))
    with open_slide(web_env.url("bone")) as s:
        np.testing.assert_array_equal(s.read(0, 0, 957, 715), truth)


def test_svs_converted_by_orthanc_wsi_dicomizer_matches_the_svs(web_env) -> None:
    with open_slide(web_env.url("svs")) as web, open_slide(data_file("wsi/aperio/CMU-1-Small-Region.svs")) as svs:
        assert web.size == svs.size == (2220, 2967)
        assert web.mpp == pytest.approx(0.499, rel=1e-3)
        assert [lv.downsample for lv in web.levels] == pytest.approx([1, 2, 4, 8], rel=2e-3)
        a, b = web.read(600, 900, 400, 400).astype(int), svs.read(600, 900, 400, 400).astype(int)
        assert np.abs(a - b).mean() < 2.0 and a.std() > 10  # same JPEG tiles, real tissue


def test_a_tile_read_fetches_only_the_frames_it_covers(web_env) -> None:
    with open_slide(web_env.url("cmu1")) as s:  # 500 px frames, 5 x 6 of them at level 0
        frames, requests = s.stats.frames, s.stats.frame_requests
        s.read(600, 600, 224, 224)  # inside frame (1, 1)
        assert (s.stats.frames - frames, s.stats.frame_requests - requests) == (1, 1)
        s.read(1400, 1400, 224, 224)  # across frames (2..3, 2..3): one batched request for four
        assert (s.stats.frames - frames, s.stats.frame_requests - requests) == (5, 2)
        s.read(600, 600, 224, 224)  # decoded frames are cached
        assert s.stats.frames - frames == 5


def test_a_pickled_slide_reopens_for_dataloader_workers(web_env) -> None:
    with open_slide(web_env.url("cmu1")) as s:
        again = pickle.loads(pickle.dumps(s))
        with again:
            assert again.backend == "dicomweb" and str(again.path) == str(s.path)
            np.testing.assert_array_equal(again.read(100, 200, 64, 64, 1), s.read(100, 200, 64, 64, 1))


def test_a_study_means_each_of_its_slides(web_env) -> None:
    study = web_env.url("cmu1", series=False)
    assert expand_slide_inputs([study, "slide.svs"]) == ([web_env.url("cmu1"), "slide.svs"], [])
    with open_slide(study) as s:  # a study with one slide opens as that slide
        assert s.name == web_env.series["cmu1"][1]
    slides, errors = expand_slide_inputs([web_env.url("ct", series=False)])
    assert slides == [] and len(errors) == 1 and "no whole-slide (modality SM) series, only CT" in errors[0]


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """A DICOMweb endpoint that denies everyone, as a server with an authorisation policy does
    (Orthanc without its authorization plugin answers 401, never 403)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(403)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: object) -> None:
        pass


def test_bad_servers_and_addresses_are_one_line_each_and_the_others_go_on(orthanc) -> None:
    forbidden = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=forbidden.serve_forever, daemon=True).start()
    stalled = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)
    study, series = orthanc.series["cmu1"]
    path = f"/dicom-web/studies/{study}/series/{series}"
    bad = {
        f"dicomweb+http://127.0.0.1:{free_port()}{path}": "cannot connect to the server",
        f"dicomweb+http://127.0.0.1:{forbidden.server_port}{path}": "refused access (HTTP 403)",
        f"dicomweb+http://127.0.0.1:{stalled.getsockname()[1]}{path}": "did not answer within 2 s",
        f"dicomweb+{orthanc.root}/dicom-web/studys/{study}": "not a DICOMweb study or series address",
        f"dicomweb+{orthanc.root}/dicomweb/studies/{study}/series/{series}": "HTTP 404",
        f"dicomweb+{orthanc.dicomweb}/studies/1.2.3.4.5.6": "no such study on the server",
        orthanc.url("ct", series=False): "no whole-slide (modality SM) series, only CT",
        orthanc.url("nonconformant"): "no whole-slide pyramid in this series",
        f"dicomweb+http://someone:{PASSWORD}@127.0.0.1:1{path}": "credentials do not belong in the URL",
        f"http://127.0.0.1:1{path}": "write the address as dicomweb+http",
    }
    try:
        env = orthanc.env | {"PATHAPP_DICOMWEB_TIMEOUT": "2", "PATHAPP_DICOMWEB_RETRIES": "1"}
        r = run_cli("info", orthanc.url("cmu1"), *bad, orthanc.url("svs"), env=env)
    finally:
        forbidden.shutdown()
        stalled.close()
    assert r.returncode == 1
    infos = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(i["backend"], i["width"]) for i in infos] == [("dicomweb", 2220)] * 2
    errors = r.stderr.strip().splitlines()
    assert len(errors) == len(bad) and all(line.startswith("error: ") for line in errors), r.stderr
    for reason in bad.values():
        assert sum(reason in line for line in errors) == 1, (reason, r.stderr)
    assert PASSWORD not in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_credentials_missing_or_wrong_are_named_never_shown(orthanc) -> None:
    r = run_cli("info", orthanc.url("cmu1"), env={})
    assert r.returncode == 1 and "asks for credentials (HTTP 401)" in r.stderr
    assert "PATHAPP_DICOMWEB_USER" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    wrong = "not-the-password-123"
    r = run_cli("info", orthanc.url("cmu1"), env={"PATHAPP_DICOMWEB_USER": "pathapp", "PATHAPP_DICOMWEB_PASSWORD": wrong})
    assert r.returncode == 1 and "refused the credentials (HTTP 401)" in r.stderr and wrong not in r.stderr
    token = "tok-abc-987"
    r = run_cli("info", orthanc.url("cmu1"), env={"PATHAPP_DICOMWEB_TOKEN": token})
    assert r.returncode == 1 and "refused the credentials" in r.stderr and token not in r.stderr


def test_tile_a_study_over_dicomweb(web_env, tmp_path) -> None:
    r = run_cli("tile", web_env.url("cmu1", series=False), "--mpp", "2.0", "--tile-size", "64", "--out", str(tmp_path),
                env=web_env.env)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / web_env.series["cmu1"][1]
    tiles = json.loads((folder / "tiles.geojson").read_text())["features"]
    assert len(tiles) > 20 and (folder / "thumbnail.png").is_file()


def test_a_batch_of_tiles_costs_one_request_and_the_same_pixels(web_env) -> None:
    from pathapp.tiles import make_grid
    from pathapp.tiles.dataset import TileDataset, read_tile, read_tiles

    with open_slide(web_env.url("svs")) as s, open_slide(web_env.url("svs")) as one_by_one:
        grid = make_grid(s, 0.5, 224)  # every tile of the slide: 9 x 13, 240 px frames
        batch = list(range(20, 52))
        requests = s.stats.frame_requests
        tiles = read_tiles(s, grid, batch)
        assert s.stats.frame_requests - requests == 1
        for i, tile in zip(batch, tiles):
            np.testing.assert_array_equal(tile, read_tile(one_by_one, grid, i))
        assert one_by_one.stats.frame_requests >= len(batch) // 2
        items = TileDataset(s, grid).__getitems__([3, 4])
        assert [i for _, i in items] == [3, 4] and tuple(items[0][0].shape) == (3, 224, 224)


def test_frames_that_vanish_from_the_server_fail_the_read_in_one_line(web_env) -> None:
    web_env.store("ez-wsi", [data_file("dicom/ez-wsi/multiframe_camelyon_challenge_image.dcm")])
    with open_slide(web_env.url("ez-wsi")) as s:
        s.read(0, 0, 256, 256)
        study = web_env.series["ez-wsi"][0]
        session = web_env.session()
        orthanc_id = session.post(f"{web_env.root}/tools/lookup", data=study, timeout=30).json()[0]["ID"]
        assert session.delete(f"{web_env.root}/studies/{orthanc_id}", timeout=30).status_code == 200
        with pytest.raises(SlideOpenError, match=r"not found on the server \(HTTP 404\)") as e:
            s.read(700, 400, 256, 256)  # frames not fetched before the instance went away
        assert "\n" not in str(e.value) and PASSWORD not in str(e.value)
