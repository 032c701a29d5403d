"""Triton adapter for prompt preprocessing; the logic lives in orchestrator.prompting."""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from hub.fetch import model_dir_if_cached
from orchestrator.errors import InvalidRequestError
from orchestrator.prompting import PromptEncoder
from orchestrator.request_inputs import refuse_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        name = os.environ.get("DSPARK_MODEL") or params["model"]
        model_dir = model_dir_if_cached(name)
        if model_dir is None:
            raise pb_utils.TritonModelException(f"model '{name}' is not fetched; run: python cli.py fetch {name}")
        self.encoder = PromptEncoder.from_model_dir(model_dir, int(params["max_context"]) - 1)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                refuse_parameters(request.parameters())
                ids = self.encoder.encode_request(inputs)
            except InvalidRequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            out = pb_utils.Tensor("input_ids", np.asarray(ids, dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
