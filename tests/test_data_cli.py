"""CLI: preview output and PNG, prepare -> check on the prepared dataset, JSON-array inputs."""
import json

from PIL import Image

from fusion_jax.data.__main__ import main as cli_main
from fusion_jax.data.testing import make_tokenizer_folder, write_dataset


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_preview_and_prepare_roundtrip(tmp_path, capsys):
    path, imgs = write_dataset(str(tmp_path), 6, size=24, bad=True)
    tok = make_tokenizer_folder(str(tmp_path / "tok"))
    png = str(tmp_path / "p.png")
    assert cli_main(["preview", path, "--image-folder", imgs, "--tokenizer", tok, "--id", "s3",
                     "--image-size", "32", "--out", png]) == 0
    text = capsys.readouterr().out
    assert "[[A cat sitting" in text and "<latent_image>" in text
    assert text.count("<<INSTRUCT>>") == 3  # the legend line + one per question
    assert Image.open(png).size[0] > 3 * 32
    assert cli_main(["preview", path, "--image-folder", imgs, "--tokenizer", tok, "--id", "b_trunc",
                     "--out", png]) == 0
    assert "SKIPPED (truncated_image)" in capsys.readouterr().out

    common = ["--tokenizer", tok, "--image-size", "32", "--json"]
    assert cli_main(["check", path, "--image-folder", imgs] + common) == 0
    raw = _last_json(capsys)
    out = str(tmp_path / "prepared")
    assert cli_main(["prepare", path, out, "--image-folder", imgs]) == 0
    capsys.readouterr()
    assert cli_main(["check", out] + common) == 0
    prep = _last_json(capsys)
    assert (prep["total"], prep["usable"], prep["skipped"]) == (raw["total"], raw["usable"], raw["skipped"])


def test_json_array_inputs(tmp_path, capsys):
    tok = make_tokenizer_folder(str(tmp_path / "tok"))
    good = {"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yo."}]}
    p = tmp_path / "a.json"
    p.write_text(json.dumps([good, 5, {"id": "x"}]))
    assert cli_main(["check", str(p), "--tokenizer", tok, "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["usable"] == 1 and rep["skipped"] == {"bad_record": 2}
    p.write_text("[{broken")
    assert cli_main(["check", str(p), "--tokenizer", tok]) == 2
    assert "not valid JSON" in capsys.readouterr().err
