"""Find similar tissue: a vector index of tile and slide embeddings (FAISS in a folder by default,
Qdrant for a shared index), searched from an image, a QuPath annotation or a tile."""

from pathapp.index.base import (IndexModel, IndexStoreError, SlideEntry, SlideRecord, SlideTiles, TileRef, VectorIndex,
                                open_index)

__all__ = ["IndexModel", "IndexStoreError", "SlideEntry", "SlideRecord", "SlideTiles", "TileRef", "VectorIndex",
           "open_index"]
