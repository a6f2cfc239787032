"""VQAv2 with ViLT: a 3129-way (the answer vocabulary's) classifier on the pooled [CLS], BCE on soft scores."""

from tasks.vilt import make

_api = make("vqa")
SCHEMA = _api.SCHEMA
build_data = _api.build_data
build_model = _api.build_model
build_task = _api.build_task
load_pretrained = _api.load_pretrained
