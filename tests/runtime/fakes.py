"""A backend for tests: records its feeds and answers with a function of them."""
import numpy as np

from cfg_export.runtime.backends.base import Backend


class RecordingBackend(Backend):
    """Runs eps_fn(feeds) -> eps; keeps every feed dict it was given in .feeds."""

    name = "fake"

    def __init__(self, manifest, eps_fn):
        super().__init__(manifest)
        self.eps_fn = eps_fn
        self.feeds = []

    def activate(self):
        pass

    def deactivate(self):
        pass

    def _infer(self, feeds):
        self.feeds.append(feeds)
        return {"eps": np.asarray(self.eps_fn(feeds), dtype=np.float32)}
