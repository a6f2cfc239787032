"""NLVR2 with ViLT: two passes (image modality types 1 and 2), pooled features concatenated, 2-way head."""

from tasks.vilt import make

_api = make("nlvr")
SCHEMA = _api.SCHEMA
build_data = _api.build_data
build_model = _api.build_model
build_task = _api.build_task
load_pretrained = _api.load_pretrained
