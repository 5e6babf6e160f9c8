"""A real DICOMweb server for the tests: Debian's Orthanc with its DICOMweb plugin, on a free loopback
port, with a temporary storage folder, basic authentication on, and the shared DICOM-WSI data (plus
the CMU-1 SVS converted by OrthancWSIDicomizer) uploaded through STOW-RS."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "pathapp", "orthanc-test-secret"

# The CMU-1 SVS is 2220 x 2967 px at 0.499 µm/px. OrthancWSIDicomizer 1.1 derives the pixel spacing from
# the imaged size with width and height crossed, so each is given the other's extent; the dataset adds
# what wsidicom and the WSI IOD need (ImageType, a frame of reference, and DimensionOrganizationType:
# TILED_SPARSE, because the frames are written in Z-order with per-frame positions).
SVS_EXTENT_MM = (2967 * 0.499e-3, 2220 * 0.499e-3)
SVS_DATASET = {
    "PatientID": "PATHAPP-CMU-1", "PatientName": "CMU^ONE", "PatientBirthDate": "", "PatientSex": "",
    "StudyID": "1", "SeriesNumber": "1", "AccessionNumber": "", "ReferringPhysicianName": "",
    "Manufacturer": "Aperio", "ManufacturerModelName": "ScanScope", "DeviceSerialNumber": "1",
    "SoftwareVersions": "OrthancWSIDicomizer", "ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
    "DimensionOrganizationType": "TILED_SPARSE", "FocusMethod": "AUTO", "ExtendedDepthOfField": "NO",
    "AcquisitionContextSequence": [], "ContainerIdentifier": "CMU-1", "IssuerOfTheContainerIdentifierSequence": [],
    "ContainerTypeCodeSequence": [], "SpecimenLabelInImage": "NO", "BurnedInAnnotation": "NO",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.23002", "PositionReferenceIndicator": "SLIDE_CORNER",
    "SpecimenDescriptionSequence": [{"SpecimenIdentifier": "CMU-1", "SpecimenUID": "1.2.826.0.1.3680043.8.498.23001",
                                     "IssuerOfTheSpecimenIdentifierSequence": [], "SpecimenPreparationSequence": []}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc; `series` maps a data set name to (StudyInstanceUID, SeriesInstanceUID)."""

    root: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    workdir: Path
    series: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    @property
    def env(self) -> dict[str, str]:
        """The environment pathapp reads its DICOMweb credentials from."""
        return {"PATHAPP_DICOMWEB_USER": USER, "PATHAPP_DICOMWEB_PASSWORD": PASSWORD}

    def url(self, name: str, *, series: bool = True) -> str:
        study, ser = self.series[name]
        return f"dicomweb+{self.dicomweb}/studies/{study}" + (f"/series/{ser}" if series else "")

    def session(self):  # noqa: ANN201 - requests.Session
        import requests

        s = requests.Session()
        s.auth = (USER, PASSWORD)
        return s

    def store(self, name: str, files: list[Path]) -> None:
        """Upload `files` through STOW-RS (POST /dicom-web/studies) and remember their series."""
        from dicomweb_client import DICOMwebClient

        datasets = [pydicom.dcmread(f) for f in files]
        answer = DICOMwebClient(self.dicomweb, session=self.session()).store_instances(datasets)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        assert not failed, f"STOW-RS refused {name}: {failed}"
        self.series[name] = (str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_orthanc(workdir: Path) -> Orthanc:
    """Start Orthanc with a generated config; raise RuntimeError (with its log) if it does not come up."""
    import requests

    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "pathapp-tests", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)], "HttpThreadsCount": 16, "StorageCompression": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - the server's lifetime, closed by the OS
    proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(workdir / "orthanc.json")],
                            stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"{root}/dicom-web/studies", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                return Orthanc(root, proc, workdir)
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")


def dicomize_svs(svs: Path, out: Path) -> list[Path]:
    """Convert an SVS into a DICOM-WSI pyramid with OrthancWSIDicomizer (orthanc-wsi)."""
    out.mkdir(parents=True)
    dataset = out.parent / "svs-dataset.json"
    dataset.write_text(json.dumps(SVS_DATASET))
    subprocess.run(
        ["OrthancWSIDicomizer", "--dataset", str(dataset), "--folder", str(out), "--pyramid", "1", "--levels", "4",
         "--compression", "jpeg", "--imaged-width", f"{SVS_EXTENT_MM[0]:.6f}",
         "--imaged-height", f"{SVS_EXTENT_MM[1]:.6f}", str(svs)],
        check=True, capture_output=True, timeout=120,
    )
    return sorted(out.glob("*.dcm"))
