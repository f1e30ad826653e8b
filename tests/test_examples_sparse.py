"""The embedding-table example (examples/embedding_mf.py) runs and every variant learns."""

import importlib.util
import os

import numpy as np


def test_embedding_mf_example_runs_and_learns(tmp_path):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "embedding_mf.py")
    spec = importlib.util.spec_from_file_location("embedding_mf", path)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    data = mf.make_data(n_users=2000, n_items=500, n_ratings=40_000)
    for variant in mf.VARIANTS:
        curve, secs = mf.train(variant, data, steps=400, evals=4)
        assert np.isfinite(curve[:, 1]).all()
        assert curve[-1, 1] < curve[0, 1], variant          # held-out RMSE goes down
