"""DICOMweb backend: a whole-slide series on a DICOMweb server (a hospital PACS, Orthanc, dcm4chee,
the cloud health APIs), addressed as `dicomweb+http(s)://host[:port]/<root>/studies/<UID>[/series/<UID>]`.

wsidicom's web source reads the series' metadata once (QIDO-RS, WADO-RS metadata) and then fetches
only the frames a region needs (WADO-RS frame retrieval, one batched request per region). This module
adds what a hospital network needs around it: credentials from the environment, a timeout on every
request, retries with exponential backoff, a connection pool sized for concurrent readers, and one
line per failure that names the URL and what to do, never the credentials."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pathapp.errors import PathappError, SlideOpenError
from pathapp.slide.dicom_backend import WsiDicomSlide

if TYPE_CHECKING:
    import requests

SCHEME = "dicomweb+"
ENV_TOKEN = "PATHAPP_DICOMWEB_TOKEN"  # bearer token (OAuth access token), wins over user/password
ENV_USER = "PATHAPP_DICOMWEB_USER"  # HTTP basic authentication
ENV_PASSWORD = "PATHAPP_DICOMWEB_PASSWORD"
ENV_TIMEOUT = "PATHAPP_DICOMWEB_TIMEOUT"  # seconds to connect, and between bytes of an answer
ENV_RETRIES = "PATHAPP_DICOMWEB_RETRIES"  # retries of a failed request (connection, timeout, 429/5xx)
ENV_CONNECTIONS = "PATHAPP_DICOMWEB_CONNECTIONS"  # pooled connections per slide handle
DEFAULTS = {ENV_TIMEOUT: 30.0, ENV_RETRIES: 3, ENV_CONNECTIONS: 8}
BACKOFF_S = 0.5  # retry n waits BACKOFF_S * 2**(n-1) seconds
RETRY_STATUS = (429, 500, 502, 503, 504)
# What to ask for when the series is lossless, in order: JPEG-LS and JPEG lossless first (Orthanc
# transcodes to them; wsidicom cannot decode uncompressed frames that arrive as a bytearray), then the
# rest of the lossless transfer syntaxes.
LOSSLESS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1")
URL_FORM = "dicomweb+http(s)://host[:port]/<DICOMweb root>/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]"
_URL = re.compile(r"^dicomweb\+(https?://[^/?#@\s]+(?:/[^?#\s]*?)?)/studies/([0-9][0-9.]*)(?:/series/([0-9][0-9.]*))?/?$")


def is_dicomweb_url(text: str | Path) -> bool:
    """True for anything written as a DICOMweb slide address (checked fully by `parse_dicomweb_url`)."""
    return isinstance(text, str) and text.lower().startswith(SCHEME)


def redact(text: str) -> str:
    """`text` with any user:password@ of a URL blanked, so messages never show credentials."""
    return re.sub(r"(?<=://)[^/@\s]*@", "***@", text)


@dataclass(frozen=True)
class DicomWebUrl:
    """A study, or one series of it, on a DICOMweb server."""

    root: str  # http(s)://host[:port]/<prefix>: the DICOMweb service root
    study: str
    series: str | None = None

    def __str__(self) -> str:
        return f"{SCHEME}{self.root}/studies/{self.study}" + (f"/series/{self.series}" if self.series else "")

    @property
    def name(self) -> str:
        """Output folder name: the series UID (the study UID for a whole study)."""
        return self.series or self.study


def parse_dicomweb_url(text: str) -> DicomWebUrl:
    """Split a `dicomweb+http(s)://…/studies/<UID>[/series/<UID>]` address; a typo is one clear line."""
    m = _URL.match(text.strip())
    if m is None:
        if re.match(r"^dicomweb\+https?://[^/]*@", text):
            raise SlideOpenError(f"{redact(text)}: credentials do not belong in the URL; set {ENV_USER} and "
                                 f"{ENV_PASSWORD} (or {ENV_TOKEN}) in the environment instead")
        raise SlideOpenError(f"{redact(text)}: not a DICOMweb study or series address; write {URL_FORM}")
    return DicomWebUrl(m.group(1), m.group(2), m.group(3))


def _setting(name: str) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return float(DEFAULTS[name])
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0 or (name != ENV_RETRIES and value == 0):
        raise PathappError(f"{name}={raw!r}: must be a {'non-negative' if name == ENV_RETRIES else 'positive'} number")
    return value


def _auth() -> requests.auth.AuthBase | None:
    """Bearer token or basic credentials from the environment; None when neither is set."""
    import requests

    token = os.environ.get(ENV_TOKEN)
    if token:

        class Bearer(requests.auth.AuthBase):
            def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
                r.headers["Authorization"] = f"Bearer {token}"
                return r

        return Bearer()
    user = os.environ.get(ENV_USER)
    if user:
        return requests.auth.HTTPBasicAuth(user, os.environ.get(ENV_PASSWORD, ""))
    return None


@dataclass
class FetchStats:
    """What this handle asked the server for: frames per tile read is the number to watch."""

    requests: int = 0
    frame_requests: int = 0
    frames: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        """requests response hook."""
        url = response.url.split("?", 1)[0]
        with self._lock:
            self.requests += 1
            if "/frames/" in url:
                self.frame_requests += 1
                self.frames += len(url.rsplit("/frames/", 1)[1].split(","))


def web_session(stats: FetchStats | None = None) -> requests.Session:
    """A requests session with the environment's credentials, a timeout on every request, retries
    with exponential backoff (connection errors, timeouts, HTTP 429/5xx; POST too, since STOW-RS of the
    same instance UIDs is idempotent) and a connection pool for concurrent frame fetches."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    timeout, retries, pool = _setting(ENV_TIMEOUT), int(_setting(ENV_RETRIES)), int(_setting(ENV_CONNECTIONS))

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            return super().send(request, **kwargs)  # type: ignore[arg-type]

    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=BACKOFF_S,
                  status_forcelist=RETRY_STATUS, allowed_methods=Retry.DEFAULT_ALLOWED_METHODS | {"POST"},
                  raise_on_status=False)
    session = requests.Session()
    adapter = TimeoutAdapter(max_retries=retry, pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.auth = _auth()
    if stats is not None:
        session.hooks["response"].append(stats.count)
    return session


def web_client(root: str, session: requests.Session):  # noqa: ANN201 - dicomweb_client.DICOMwebClient
    """A dicomweb-client on `session`, whose own retry loop (five tries on any error, timeouts
    included) is switched off so that the session's retry policy is the only one."""
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(root, session=session)
    client.set_http_retry_params(retry=False)
    return client


def explain(exc: BaseException) -> str | None:
    """What went wrong talking to a DICOMweb server, and what to do, in one line; None when `exc`
    is not a network or HTTP failure."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code, has_credentials = exc.response.status_code, bool(_auth())
        if code == 401:
            if has_credentials:
                return f"the server refused the credentials (HTTP 401); check {ENV_TOKEN} or {ENV_USER}/{ENV_PASSWORD}"
            return (f"the server asks for credentials (HTTP 401); set {ENV_TOKEN} (bearer) or {ENV_USER} and "
                    f"{ENV_PASSWORD} (basic) in the environment")
        if code == 403:
            return "the server refused access (HTTP 403); ask its administrator to grant these credentials read access"
        if code == 404:
            return "not found on the server (HTTP 404); check the UIDs and the DICOMweb root in the address (e.g. /dicom-web)"
        return f"the server answered HTTP {code} {exc.response.reason}".rstrip()
    if isinstance(exc, requests.Timeout) or (
        isinstance(exc, requests.ConnectionError) and isinstance(getattr(exc.args[0], "reason", None), ReadTimeoutError)
    ):
        return (f"the server did not answer within {_setting(ENV_TIMEOUT):g} s (after {int(_setting(ENV_RETRIES))} "
                f"retries); check that it is up, or allow longer with {ENV_TIMEOUT}")
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect to the server; check the host and port, and that the server is running"
    if isinstance(exc, requests.RequestException):
        return f"request failed ({type(exc).__name__})"
    return None


@contextmanager
def reported(url: DicomWebUrl | str) -> Iterator[None]:
    """Turn network and HTTP failures inside the block into one SlideOpenError line naming `url`."""
    try:
        yield
    except PathappError:
        raise
    except Exception as e:  # noqa: BLE001 - requests, urllib3 and wsidicom raise their own types
        reason = explain(e)
        if reason is None:
            raise
        raise SlideOpenError(f"{redact(str(url))}: {reason}") from None


def wsi_series(text: str) -> list[str]:
    """The slide addresses behind `text`: itself for a series, each whole-slide (modality SM) series
    for a study. A study without one is an error naming what it holds."""
    url = parse_dicomweb_url(text)
    if url.series:
        return [str(url)]
    with web_session() as session, reported(url):
        client = web_client(url.root, session)
        found = client.search_for_series(url.study, search_filters={"Modality": "SM"})
        uids = [s["0020000E"]["Value"][0] for s in found if "SM" in s.get("00080060", {}).get("Value", ["SM"])]
        if not uids:
            every = client.search_for_series(url.study)
            if not every:
                raise SlideOpenError(f"{url}: no such study on the server; check the StudyInstanceUID")
            held = sorted({m for s in every for m in s.get("00080060", {}).get("Value", ["?"])})
            raise SlideOpenError(f"{url}: the study has no whole-slide (modality SM) series, only {', '.join(held)}; "
                                 f"give a study or series with slide images")
    return [str(replace(url, series=uid)) for uid in uids]


class DicomWebSlide(WsiDicomSlide):
    """One whole-slide series read over DICOMweb. `path` stays the address string (a Path would
    fold its '//'), so the slide pickles and reopens in DataLoader workers like a file does."""

    backend = "dicomweb"

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        from wsidicom import WsiDicom, WsiDicomWebClient
        from wsidicom.errors import WsiDicomNotFoundError

        url = parse_dicomweb_url(str(path))
        if url.series is None:
            series = wsi_series(str(url))
            if len(series) > 1:
                raise SlideOpenError(f"{url}: the study holds {len(series)} slides; give one as …/series/<UID> "
                                     f"(`pathapp infer` and `pathapp tile` run each slide of a study)")
            url = parse_dicomweb_url(series[0])
        super().__init__(str(url), slide_mpp)
        self.path = str(url)  # type: ignore[assignment]
        self.url = url
        self.stats = FetchStats()
        self._session = web_session(self.stats)
        try:
            with reported(url):
                client = WsiDicomWebClient(web_client(url.root, self._session))
                wsi = WsiDicom.open_web(client, url.study, url.series)
                base = wsi.levels[0].default_instance
                header = base.dataset.as_dataset()
                if header.get("LossyImageCompression") != "01" and base.image_data.transfer_syntax not in LOSSLESS:
                    # wsidicom asks for JPEG first, and a server transcodes a lossless image to it;
                    # ask for the stored pixels instead.
                    wsi.close()
                    wsi = WsiDicom.open_web(client, url.study, url.series, requested_transfer_syntax=LOSSLESS)
                    base = wsi.levels[0].default_instance
                self._adopt(wsi, str(header.get("PhotometricInterpretation", "")), str(base.image_data.transfer_syntax))
        except WsiDicomNotFoundError:
            self._session.close()
            raise SlideOpenError(f"{url}: no whole-slide pyramid in this series (no VOLUME images wsidicom can "
                                 f"read); check that it is a DICOM-WSI series with ImageType and "
                                 f"DimensionOrganizationType") from None
        except BaseException:
            self._session.close()
            raise

    @property
    def name(self) -> str:
        return self.url.name

    def prefetch(self, regions: Sequence[tuple[int, int, int, int]], level: int = 0) -> None:
        """Fetch every frame the regions need and the cache lacks in one batched WADO-RS request, and
        decode them into wsidicom's frame cache, so the reads that follow cost no round trip. Only
        as many frames as fill half the cache are fetched; reads fetch the rest themselves."""
        from wsidicom.config import get_settings
        from wsidicom.geometry import Point

        lv = self.levels[level]
        instance = self._wsi.levels[level].get_instance()
        data = instance.image_data
        tw, th = data.tile_size.width, data.tile_size.height
        points: dict[Point, None] = {}  # ordered: the frames of the first regions first
        for x, y, w, h in regions:
            lx, ly = int(round(x / lv.downsample)), int(round(y / lv.downsample))
            x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lv.width), min(ly + h, lv.height)
            for ty in range(y0 // th, (y1 - 1) // th + 1 if y1 > y0 else 0):
                for tx in range(x0 // tw, (x1 - 1) // tw + 1 if x1 > x0 else 0):
                    points[Point(tx, ty)] = None
        budget = max(1, get_settings().decoded_frame_cache_size // (2 * tw * th * data.samples_per_pixel))
        with reported(self.url):
            for _ in data.get_decoded_tiles(list(points)[:budget], instance.default_z, instance.default_path):
                pass

    def _read_level(self, x: int, y: int, w: int, h: int, level: int):  # type: ignore[no-untyped-def]
        with reported(self.url):
            return super()._read_level(x, y, w, h, level)

    def close(self) -> None:
        super().close()
        self._session.close()
