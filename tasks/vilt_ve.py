"""SNLI-VE with ViLT (PuMer's head): entailment / neutral / contradiction from image and hypothesis."""

from tasks.vilt import make

_api = make("ve")
SCHEMA = _api.SCHEMA
build_data = _api.build_data
build_model = _api.build_model
build_task = _api.build_task
load_pretrained = _api.load_pretrained
