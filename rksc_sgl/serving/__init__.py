"""HTTP serving of the embedded engine: SGLang's native API and OpenAI's (``rksc-sgl serve``)."""
