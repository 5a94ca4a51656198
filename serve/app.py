"""Entry point of the Ray Serve application, named by `import_path` in serve/config.yaml.

The deployments (ingress, encoder, one head per task) live in `cmaclip.serving`, so that an
installed package serves without this folder; this module only names the builder for Serve.

    serve run serve/config.yaml
    serve deploy serve/config.yaml --address http://127.0.0.1:8265
"""

from cmaclip.serving import build_app, build_encoder

__all__ = ["build_app", "build_encoder"]
