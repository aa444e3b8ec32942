#!/usr/bin/env bash
# The declared floors of kdad's Python-level dependencies, tested before a release
# (`make test-floors`; README, Development). A second environment takes the lowest versions
# pyproject.toml declares for Lightning, torchmetrics, Hydra, OmegaConf, timm, wandb, numpy,
# scipy, matplotlib, Pillow and the export extra's onnx and onnxruntime, in front of the main
# environment (.venv, which `make test` builds with the newest ones), and runs the tests that
# exercise them: the commands end to end, the variants, the metrics, W&B offline and the sweeps.
#
# torch and torchvision are taken from .venv: their floors (torch 2.4, torchvision 0.19) are
# several GB of CUDA wheels; FLOOR_TORCH=1 installs them too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-floors}
MAIN=${MAIN:-.venv}
python3 -m venv "$VENV"
main_site=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
floor_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The main environment's packages (and its editable kdad) behind the floors installed here.
echo "import site; site.addsitedir('$(cd "$main_site" && pwd)')" > "$floor_site/zz_main_venv.pth"
floors=$("$MAIN/bin/python" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["export"]
keep = {"lightning", "torchmetrics", "hydra-core", "omegaconf", "timm", "wandb", "numpy",
        "scipy", "matplotlib", "pillow", "onnx", "onnxruntime"}
for dep in deps:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
    if m and m.group(1).lower() in keep:
        print(f"{m.group(1)}=={m.group(2)}")
EOF
)
if [[ "${FLOOR_TORCH:-0}" == 1 ]]; then
  floors="$floors $("$MAIN/bin/python" - <<'EOF'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"(torch|torchvision)\s*>=\s*([0-9][^,;\s]*)", dep)
    if m:
        print(f"{m.group(1)}=={m.group(2)}.*")
EOF
)"
fi
echo "floors: $floors"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $floors
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
for name in ("lightning", "torchmetrics", "hydra-core", "omegaconf", "timm", "wandb", "numpy",
             "scipy", "matplotlib", "pillow", "onnx", "onnxruntime", "protobuf", "torch",
             "torchvision"):
    print(f"{name} {m.version(name)}")
EOF
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/cli/test_cli.py tests/test_readme_commands.py tests/metrics tests/models/test_models.py \
  tests/models/test_knn.py tests/engine/test_wandb.py tests/engine/test_sweeps.py \
  tests/engine/test_resume.py "$@"
