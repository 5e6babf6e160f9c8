"""Write what inference found: QuPath GeoJSON, heatmaps, embeddings, run metadata."""

from pathapp.results.report import write_index
from pathapp.results.result import SlideResult
from pathapp.results.run import is_done, read_done, write_results

__all__ = ["SlideResult", "is_done", "read_done", "write_index", "write_results"]
