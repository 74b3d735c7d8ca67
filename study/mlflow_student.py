"""The sCM student as an MLflow model: seeds in, images out (MLflow "models from code").

MLflow copies this file into the logged model and runs it when the model is loaded, so no pickle is involved; it
needs this project installed (like the exported diffusers pipeline's ``trust_remote_code``). The model's artifact
``pipeline`` is the student exported as a diffusers pipeline (:func:`study.export.export_pipeline`), loaded from its
safetensors and JSON files with :func:`study.export.load_pipeline`; ``student`` is the project's own model file
(what ``teacher.source: models:/...`` and ``generate --model models:/...`` read).

    model = mlflow.pyfunc.load_model("models:/scm-default-cpu-s-student@current")
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}), params={"num_inference_steps": 2})  # uint8 (N, H, W, C)

Image ``i`` is drawn from the noise of its seed exactly as the sample stage and ``python -m pipeline generate`` do.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class SCMStudent(PythonModel):
    """``predict(DataFrame with a "seed" column[, "label"], params={"num_inference_steps": M}) -> uint8 images``."""

    def load_context(self, context):  # no type hints: MLflow would read them as a schema
        from study.export import load_pipeline

        self.pipe = load_pipeline(context.artifacts["pipeline"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        steps = int((params or {}).get("num_inference_steps", 2))
        seeds = [int(s) for s in model_input["seed"]]
        labels = None
        if "label" in getattr(model_input, "columns", ()):
            labels = torch.tensor([int(c) for c in model_input["label"]], dtype=torch.int64)
        images = self.pipe(seeds=seeds, num_inference_steps=steps, class_labels=labels, output_type="pt").images
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


mlflow.models.set_model(SCMStudent())
