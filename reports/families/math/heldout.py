"""Write heldout.json: the AddSub, SingleEq and MultiArith questions of LLM-Adapters that math_data.json (the training
set) does not contain, by exact instruction match after lower-casing (79 + 102 + 109 = 290 questions).

    python reports/families/math/heldout.py ../shared/data/llm-adapters

The data is LLM-Adapters' (AGI-Edgerunners/LLM-Adapters, ODC-By); each record keeps its fields and gains `set`.
"""
import json
import sys
from pathlib import Path

SETS = ("AddSub", "SingleEq", "MultiArith")


def main(folder: str) -> None:
    folder = Path(folder)
    seen = {r["instruction"].strip().lower() for r in json.loads((folder / "math_data.json").read_text())}
    out = []
    for name in SETS:
        records = json.loads((folder / f"{name}-test.json").read_text())
        kept = [r | {"set": name} for r in records if r["instruction"].strip().lower() not in seen]
        print(f"{name}: {len(kept)} of {len(records)} questions are not in math_data.json")
        out.extend(kept)
    path = Path(__file__).with_name("heldout.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(out)} questions)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/llm-adapters")
