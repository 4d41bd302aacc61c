"""seqlab: interchangeable sequence backbones on forecasting, classification and translation."""

from pathlib import Path

from seqlab.utils.resolvers import project_root, register_resolvers
from seqlab.utils.secrets import load_env_file

__version__ = "0.1.0"

register_resolvers()
# credentials from <project root>/.env (git-ignored); the environment wins
load_env_file(Path(project_root()) / ".env")
