"""Cytomine adapters at the edge of pathapp (nothing in the core imports this package).

- `job`: the legacy Cytomine-ULiège app (descriptor.json, `pathapp cytomine job`), talking to the
  server's REST API through `client` (our own small signed-requests client: see its docstring for
  why not cytomine-python-client);
- `task`: the Cytomine App Engine task (descriptor.yml, `pathapp cytomine task`): files in, files out;
- `wkt`: Cytomine's bottom-left-origin coordinates;
- `analyse`: what both share (model lookup, one slide through inference).
"""
