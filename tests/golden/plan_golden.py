"""The golden `kvpool plan --json` of every preset x tp in {1, 2, 4, 8} x kv dtype in {bf16, fp8}.

`python tests/golden/plan_golden.py` rewrites tests/golden/plan_json.json from the current code; do it only
for an intended change of the planner's figures, and say why in the commit message.
"""
import contextlib
import io
import json
from pathlib import Path

GOLDEN = Path(__file__).with_name("plan_json.json")
TPS = (1, 2, 4, 8)
KV_DTYPES = ("bf16", "fp8")


def cases() -> list[tuple[str, int, str]]:
    from kvpool.cli_render import model_rows

    return [(row["name"], tp, kv) for row in model_rows() for tp in TPS for kv in KV_DTYPES]


def run(name: str, tp: int, kv: str) -> dict:
    """``{"rc", "json", "error"}`` of ``kvpool plan NAME --tp TP --kv-dtype KV --json``, in process."""
    from kvpool import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["plan", name, "--tp", str(tp), "--kv-dtype", kv, "--json"])
    return {"rc": rc, "json": json.loads(out.getvalue()) if rc == 0 else None,
            "error": err.getvalue().strip().splitlines()[0] if rc != 0 else None}


def key(name: str, tp: int, kv: str) -> str:
    return f"{name} tp={tp} kv={kv}"


if __name__ == "__main__":
    golden = {key(*c): run(*c) for c in cases()}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(golden)} cases to {GOLDEN}")
