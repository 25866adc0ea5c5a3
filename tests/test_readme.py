"""The README's example of use in one's own Lightning project runs as written and learns without forgetting."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_example_trains_a_continual_model(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "for task in stream" in block)
    monkeypatch.chdir(tmp_path)  # the default Trainer writes lightning_logs/ and checkpoints here
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    result = namespace["evaluation"].result().summary()
    assert len(namespace["evaluation"].matrix) == 5
    assert result["acc"] > 0.85 and result["forgetting"] < 0.1  # replay keeps the old digits (naive: 0.19, 0.99)
    assert "average accuracy" in capsys.readouterr().out
