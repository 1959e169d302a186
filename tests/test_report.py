"""dattri.report: the HTML page (parsed), renderers, the
benchmark pages (``dattri report``, ``dattri bench``) and a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from dattri.benchmark.cli import main
from dattri.benchmark.datasets.maestro.data import EventDataset
from dattri.benchmark.datasets.maestro.events import Note, notes_to_events
from dattri.benchmark.datasets.mnist.data import create_mnist_5k_dataset
from dattri.benchmark.datasets.shakespeare_char.data import CharBlockDataset, CharVocab
from dattri.errors import DattriValueError
from dattri.report import (
    GenericRenderer,
    custom,
    piano_roll,
    topk_from_scores,
    write_report,
)
from dattri.report.bench import report_setting


# ----------------------------------------------------------------------------- helpers
class _Page(HTMLParser):
    """Collects the report's cards, sections, images and the text of <pre> blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.cards, self.sections, self.images, self.pre, self.tags = [], [], [], [], []
        self._in_pre = False
        self.summary: dict[str, str] = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "figure":
            self.cards.append(a)
        elif tag == "section":
            self.sections.append(a)
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False
        elif tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell)
            if tag == "th":
                self._key = text
            else:
                self.summary.setdefault(self._key, text)
            self._cell = None

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _kind(page: _Page, kind: str) -> list[dict]:
    return [c for c in page.cards if c.get("data-kind") == kind]


def _png(uri: str) -> np.ndarray:
    from matplotlib.image import imread

    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    return imread(io.BytesIO(base64.b64decode(data)), format="png")


def _check_against_scores(page: _Page, score: torch.Tensor, k: int, columns: list[int]) -> None:
    """Every section's proponents / opponents are the column's top-k of ``score``."""
    assert [int(s["data-test-index"]) for s in page.sections] == columns
    for kind, descending in (("proponent", True), ("opponent", False)):
        cards = _kind(page, kind)
        assert len(cards) == k * len(columns)
        for c, j in enumerate(columns):
            mine = cards[c * k:(c + 1) * k]
            assert [int(m["data-rank"]) for m in mine] == list(range(k))
            rows = [int(m["data-train-index"]) for m in mine]
            values = torch.tensor([float(m["data-score"]) for m in mine], dtype=torch.float64)
            ref = torch.sort(score[:, j].to(torch.float64), descending=descending)
            assert rows == ref.indices[:k].tolist()
            torch.testing.assert_close(values, ref.values[:k], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(values, score[rows, j].to(torch.float64), rtol=0, atol=0)


@pytest.fixture(scope="module")
def digits():
    ds = create_mnist_5k_dataset()
    return ds.subset(range(0, 5000, 20)), ds.subset(range(7, 5000, 250))  # 250 / 20, all classes


# ----------------------------------------------------------------------------- the page
def test_image_page_holds_the_score_matrix_top_k_and_the_flipped_ranking(tmp_path, digits):
    train, test = digits
    g = torch.Generator().manual_seed(1)
    score = torch.randn(len(train), len(test), generator=g, dtype=torch.float64)
    columns, k = [0, 5, 19], 4
    self_inf = torch.randn(len(train), generator=g)
    flipped = torch.zeros(len(train), dtype=torch.int64)
    flipped[torch.argsort(self_inf, descending=True)[[0, 2, 9]]] = 1
    flipped[17] = 1  # flipped but not in the ranking
    path = write_report(tmp_path / "mnist.html", topk_from_scores(score, k, columns), train, test,
                        method="Grad-Dot", checkpoints=["m/a.safetensors"],
                        metrics={"LDS": 0.25, "AUC": 0.9}, self_influence=self_inf,
                        flipped=flipped, num_noisy=10)
    page = _parse(path)
    _check_against_scores(page, score, k, columns)
    noisy = _kind(page, "self-influence")
    order = torch.argsort(self_inf, descending=True)[:10]
    assert [int(c["data-train-index"]) for c in noisy] == order.tolist()
    assert [int(c["data-flipped"]) for c in noisy] == flipped[order].tolist()
    assert sum("flipped" in c["class"].split() for c in noisy) == 3
    assert page.summary["LDS"] == "0.2500" and page.summary["method"] == "Grad-Dot"
    assert page.summary["checkpoints"] == "1: m/a.safetensors"
    # flipped rows given as indices instead of a mask: the same flags
    by_rows = write_report(tmp_path / "rows.html", topk_from_scores(score, k, columns), train,
                           test, self_influence=self_inf, flipped=flipped.nonzero().flatten())
    assert [c["data-flipped"] for c in _kind(_parse(by_rows), "self-influence")][:10] == \
        [c["data-flipped"] for c in noisy]
    # self-contained: images inline, no script, no network
    assert "script" not in page.tags and "http" not in path.read_text()
    shown = 10 + 2 * k * len(columns) + len(columns)
    assert len(page.images) == shown
    first = _png(page.images[0])
    assert first.shape[:2] == (28, 28)
    row = int(noisy[0]["data-train-index"])  # the pixels are the digit's, de-normalised
    np.testing.assert_allclose(first[..., 0] if first.ndim == 3 else first,
                               train.data[row].numpy() / 255.0, atol=1 / 255 + 1e-6)


def test_page_refuses_rows_outside_the_training_set(tmp_path, digits):
    train, test = digits
    top = topk_from_scores(torch.randn(len(train) + 5, 3), 2)
    top.proponents[0, 0] = len(train) + 3
    with pytest.raises(DattriValueError, match="fall outside train_dataset"):
        write_report(tmp_path / "x.html", top, train, test)
    with pytest.raises(DattriValueError, match="self_influence: 3 values for 250"):
        write_report(tmp_path / "x.html", topk_from_scores(torch.randn(len(train), 3), 2),
                     train, test, self_influence=torch.ones(3))


def _screenshot(html: Path, tmp_path: Path) -> np.ndarray:
    from matplotlib.image import imread

    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: the browser test needs Debian's chromium; "
                    "run `apt-get update && apt-get install -y chromium` (the README's test "
                    "command does)")
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=600)
    return imread(shot)


def test_page_renders_in_headless_chromium(tmp_path, digits):
    train, test = digits
    score = torch.randn(len(train), len(test), generator=torch.Generator().manual_seed(2))
    path = write_report(tmp_path / "page.html", topk_from_scores(score, 5, [1, 2]), train, test,
                        method="Grad-Dot")
    img = _screenshot(path, tmp_path)
    assert img.shape[:2] == (2000, 1200)
    grey = img[..., :3].mean(axis=-1)
    dark = grey < 0.5  # text, borders and the black digit backgrounds on a white page
    assert 0.02 < dark.mean() < 0.6, dark.mean()
    assert grey.var() > 0.01
    # the digits are where the page puts them: dark pixels in the top and lower thirds
    assert dark[:700].mean() > 0.01 and dark[700:1400].mean() > 0.01


# ----------------------------------------------------------------------------- modalities
def test_text_page_shows_the_windows_escaped_with_the_attributed_characters(tmp_path):
    text = "To be, or not to be: <that> is the question & so on.\nWhether 'tis nobler\n" * 3
    vocab = CharVocab.from_text(text)
    ids = torch.from_numpy(vocab.encode(text))
    block, starts = 12, torch.arange(0, len(text) - 13, 7)
    x = torch.stack([ids[s:s + block] for s in starts])
    y = torch.stack([ids[s + 1:s + block + 1] for s in starts])
    train = CharBlockDataset(x, y, vocab=vocab, source="test", licence="public domain")
    test = CharBlockDataset(x[:3], y[:3], vocab=vocab, source="test", licence="public domain")
    score = torch.randn(len(train), 3, generator=torch.Generator().manual_seed(3))
    from dattri.report import default_renderer

    path = write_report(tmp_path / "text.html", topk_from_scores(score, 3), train, test,
                        test_renderer=default_renderer(test, last_only=True))
    page = _parse(path)
    _check_against_scores(page, score, 3, [0, 1, 2])
    window = [text[s:s + block + 1] for s in starts.tolist()]
    cards = [c for c in page.cards]
    assert len(page.pre) == len(cards)
    for card, shown in zip(cards, page.pre):
        row = int(card.get("data-train-index", card.get("data-test-index")))
        assert shown == window[row]  # every character, unescaped by the parser
    raw = path.read_text()
    assert "&lt;that&gt;" in raw and "<that>" not in raw
    assert raw.count("<mark>") == 3  # the test side marks the last character only


def test_piano_roll_of_events_and_a_music_page(tmp_path):
    notes = [Note(0.0, 0.5, 60, 100), Note(0.25, 1.0, 64, 40), Note(1.0, 1.2, 67, 80)]
    tokens = torch.from_numpy(notes_to_events(notes))
    roll, count = piano_roll(tokens)
    assert count == 3 and roll.shape == (128, 121)
    expected = np.zeros((128, 121))
    for n in notes:
        v = (n.velocity // 4) * 4 + 2  # the 32 velocity bins, decoded
        expected[n.pitch, round(n.start * 100):round(n.end * 100)] = v / 127
    np.testing.assert_allclose(roll, expected)
    # a window that starts inside a note: its NOTE_OFF alone draws nothing
    late = torch.cat([torch.tensor([128 + 50]), tokens])
    assert np.array_equal(piano_roll(late)[0], roll)
    seqs = torch.stack([torch.roll(tokens, s) for s in range(6)])
    train = EventDataset(seqs[:, :-1], seqs[:, 1:], pieces=["p"], piece=torch.zeros(6, dtype=torch.int64),
                         transposition=torch.zeros(6, dtype=torch.int64), source="test", licence="-")
    score = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    path = write_report(tmp_path / "music.html", topk_from_scores(score, 2), train,
                        Subset(train, [0, 1]))
    page = _parse(path)
    _check_against_scores(page, score, 2, [0, 1])
    rolls = [p for p in page.images]
    assert len(rolls) == len(page.cards) == 2 + 2 * 2 * 2
    assert all(_png(p).shape[0] > 50 for p in rolls)  # a drawn figure, not a blank pixel


def test_generic_and_custom_renderers(tmp_path):
    feats = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    data = TensorDataset(feats, torch.arange(10))
    score = torch.randn(10, 2, generator=torch.Generator().manual_seed(5))
    path = write_report(tmp_path / "generic.html", topk_from_scores(score, 2), data, data)
    raw = path.read_text()
    assert "(4,) float32" in raw and "[4, 5, 6, 7]" in raw and "label 1" in raw
    calls = []

    def draw(item):
        calls.append(int(item[1]))
        return np.full((4, 4), float(item[1]) / 10)

    path = write_report(tmp_path / "custom.html", topk_from_scores(score, 2), data, data,
                        renderer=custom(draw), test_renderer=GenericRenderer())
    page = _parse(path)
    shown = {int(c["data-train-index"]) for c in page.cards if "data-train-index" in c}
    assert sorted(calls) == sorted(shown)  # each training example rendered once
    for card_uri in page.images:
        if _png(card_uri).shape[:2] == (4, 4):
            break
    else:
        pytest.fail("the custom renderer's image is not on the page")


# ----------------------------------------------------------------------------- benchmark pages
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("report_cache")


def test_tiny_setting_page_agrees_with_the_methods_score_matrix(tmp_path, cache):
    from dattri.benchmark.load import load_benchmark
    from dattri.benchmark.methods import get_method
    from dattri.metric import lds, mislabel_detection_auc

    path = report_setting("mnist_lr", tmp_path / "tiny.html", size="tiny", method="Grad-Dot",
                          evaluate=True, num_test=5, k=4, num_noisy=8, cache_dir=cache)
    page = _parse(path)
    md, gt = load_benchmark("lr", "mnist", "lds", size="tiny", cache_dir=cache, progress=False)
    batch = md["setting"].attr_batch_size  # the report's loaders: bitwise the same scores
    loader = {s: DataLoader(md[f"{s}_dataset"], batch_size=batch, sampler=md[f"{s}_sampler"])
              for s in ("train", "test")}
    att = get_method("Grad-Dot").build(md, {}, {})
    score = att.attribute(loader["train"], loader["test"]).cpu()
    columns = [0, 5, 10, 14, 19]  # 5 evenly spaced of the 20 test examples
    _check_against_scores(page, score, 4, columns)
    assert float(page.summary["LDS (Grad-Dot, default)"]) == pytest.approx(
        float(lds(score, gt)[0].nanmean()), abs=5e-5)
    mdn, gtn = load_benchmark("lr", "mnist", "auc", size="tiny", cache_dir=cache, progress=False)
    train_n = DataLoader(mdn["train_dataset"], batch_size=batch, sampler=mdn["train_sampler"])
    self_inf = get_method("Grad-Dot").build(mdn, {}, {}).self_attribute(train_n).cpu()
    noisy = _kind(page, "self-influence")
    rows = [int(c["data-train-index"]) for c in noisy]
    assert rows == torch.argsort(self_inf, descending=True)[:8].tolist()
    assert [int(c["data-flipped"]) for c in noisy] == gtn[0][rows].int().tolist()
    assert float(page.summary["AUC (Grad-Dot, default)"]) == pytest.approx(
        float(mislabel_detection_auc(self_inf, gtn[0])[0]), abs=5e-5)


def test_bench_writes_the_page_of_its_best_method_and_prints_it(tmp_path, cache, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--size", "tiny", "--settings", "mnist_lr", "--methods",
                 "Grad-Dot,Grad-Cos", "--metrics", "lds,auc", "--search", "quick",
                 "--no-progress", "--no-plot", "--out", str(out), "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    page_path = out / "figures" / "report_mnist_lr.html"
    assert f"Report: {page_path}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reports"] == [str(page_path)]
    rows = {(r["metric"], r["method"]): r for r in summary["rows"]}
    best = max(("Grad-Dot", "Grad-Cos"), key=lambda m: rows[("lds", m)]["value"])
    best_auc = max(("Grad-Dot", "Grad-Cos"), key=lambda m: rows[("auc", m)]["value"])
    page = _parse(page_path)
    assert page.summary["method"] == f"{best} (default)"
    assert float(page.summary[f"LDS ({best}, default)"]) == pytest.approx(
        rows[("lds", best)]["value"], abs=5e-5)
    assert float(page.summary[f"AUC ({best_auc}, default)"]) == pytest.approx(
        rows[("auc", best_auc)]["value"], abs=5e-5)
    assert len(page.sections) == 6 and len(_kind(page, "self-influence")) == 12
    # dattri report --bench-out: the same choice; --topk: a precomputed ranking, no attribution
    top = topk_from_scores(torch.randn(200, 20, generator=torch.Generator().manual_seed(6)), 3,
                           [2, 7])
    args = ["report", "--setting", "mnist_lr", "--size", "tiny", "--cache-dir", str(cache),
            "--no-progress"]
    assert main([*args, "--bench-out", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert _parse(tmp_path / "r.html").summary["method"] == f"{best} (default)"
    assert main([*args, "--topk", str(top.save(tmp_path / "top.pt")), "--num-noisy", "0",
                 "--out", str(tmp_path / "t.html")]) == 0
    assert f"Report: {tmp_path / 't.html'}" in capsys.readouterr().out
    given = _parse(tmp_path / "t.html")
    assert [int(s["data-test-index"]) for s in given.sections] == [2, 7]
    assert [int(c["data-train-index"]) for c in _kind(given, "opponent")] == \
        top.opponents.reshape(-1).tolist()
    assert not _kind(given, "self-influence")


# ----------------------------------------------------------------------------- real text and music
def _bigram_grad_dot(vocab_size: int, train, test) -> torch.Tensor:
    """Grad-Dot scores of a seeded bigram language model (logits = embedding of the token)."""
    from torch import nn

    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    torch.manual_seed(0)
    model = nn.Embedding(vocab_size, vocab_size)

    def loss(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    return att.attribute(DataLoader(train, batch_size=8), DataLoader(test, batch_size=8)).cpu()


def test_shakespeare_page_shows_real_windows(tmp_path):
    import warnings

    from dattri.benchmark.datasets.shakespeare_char.data import (
        create_shakespeare_dataset,
        load_shakespeare_text,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offline stand-in says so
        train, test = create_shakespeare_dataset(block_size=48, n_train=40, n_test=3)
        text = load_shakespeare_text()[0]
    score = _bigram_grad_dot(len(train.vocab), train, test)
    path = write_report(tmp_path / "shakespeare.html", topk_from_scores(score, 3), train, test)
    page = _parse(path)
    _check_against_scores(page, score, 3, [0, 1, 2])
    assert len(page.pre) == len(page.cards) == 3 + 2 * 3 * 3
    for card, shown in zip(page.cards, page.pre):
        x, y = (train if "data-train-index" in card else test)[
            int(card.get("data-train-index", card.get("data-test-index")))]
        assert shown == train.vocab.decode(torch.cat([x, y[-1:]]))
        assert len(shown) == 49 and shown in text  # 48 context characters and the last target


def test_chorale_page_shows_piano_rolls(tmp_path):
    import warnings

    from dattri.benchmark.datasets.maestro.data import create_maestro_datasets
    from dattri.benchmark.datasets.maestro.events import VOCAB_SIZE, events_to_notes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offline stand-in (Bach chorales) says so
        train, test = create_maestro_datasets(max_pieces=1, seq_len=64, n_train=None,
                                              n_test=None, cache_dir=tmp_path)
    train = Subset(train, range(0, len(train), max(len(train) // 30, 1)))
    test = Subset(test, [0, 5])
    score = _bigram_grad_dot(VOCAB_SIZE, train, test)
    from dattri.report import default_renderer

    path = write_report(tmp_path / "chorales.html", topk_from_scores(score, 2), train, test,
                        test_renderer=default_renderer(test, last_only=True))
    page = _parse(path)
    _check_against_scores(page, score, 2, [0, 1])
    assert len(page.images) == len(page.cards) == 2 + 2 * 2 * 2
    raw = path.read_text()
    x, y = train[int(_kind(page, "proponent")[0]["data-train-index"])]
    notes = events_to_notes(torch.cat([x, y[-1:]]).numpy())
    assert f"65 events, {len(notes)} notes" in raw and len(notes) > 0
    for uri in page.images:
        img = _png(uri)
        assert img.shape[0] > 50 and img[..., :3].var() > 1e-3  # a drawn roll, not blank


def test_colour_images_are_drawn_de_normalised(tmp_path):
    from dattri.benchmark.datasets._io import ImageDataset

    g = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (6, 32, 32, 3), generator=g, dtype=torch.uint8)
    data = ImageDataset(pixels, torch.arange(6) % 2, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3),
                        classes=["cat", "dog"], source="test", licence="-")
    score = torch.randn(6, 1, generator=g)
    page = _parse(write_report(tmp_path / "rgb.html", topk_from_scores(score, 2), data, data))
    rows = [int(c.get("data-train-index", c.get("data-test-index"))) for c in page.cards]
    for row, uri in zip(rows, page.images):
        img = _png(uri)
        assert img.shape[:2] == (32, 32)
        np.testing.assert_allclose(img[..., :3], pixels[row].numpy() / 255.0, atol=1 / 255 + 1e-6)
    assert "label 1: dog" in (tmp_path / "rgb.html").read_text()


def test_topk_from_attributor_ranks_only_the_chosen_test_examples(tmp_path):
    from torch import nn

    from dattri.algorithm import TracInAttributor
    from dattri.report import topk_from_attributor
    from dattri.task import AttributionTask

    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    train, test = TensorDataset(x[:24], y[:24]), TensorDataset(x[24:], y[24:])
    model = nn.Linear(5, 3).double()

    def loss(params, data):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (data[0],)),
                                           data[1])

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    loader = DataLoader(train, batch_size=5)
    top, score = topk_from_attributor(att, loader, test, [4, 1], 3, batch_size=1)
    full = att.attribute(loader, DataLoader(test, batch_size=6))
    torch.testing.assert_close(score, full[:, [4, 1]])
    # dense reference: per-example gradients of the linear layer, g_i . g_j
    def grads(xs, ys):
        p = torch.softmax(xs @ model.weight.detach().T + model.bias.detach(), -1)
        d = p - nn.functional.one_hot(ys, 3)
        return torch.cat([(d[:, :, None] * xs[:, None, :]).flatten(1), d], dim=1)

    ref = grads(x[:24], y[:24]) @ grads(x[24:], y[24:])[[4, 1]].T
    torch.testing.assert_close(score, ref)
    assert top.test_indices.tolist() == [4, 1]
    assert torch.equal(top.proponents, torch.argsort(ref, dim=0, descending=True)[:3].T)
    assert torch.equal(top.opponents, torch.argsort(ref, dim=0)[:3].T)
    page = _parse(write_report(tmp_path / "user.html", top, train, test, method="Grad-Dot"))
    _check_against_scores(page, torch.zeros(24, 6, dtype=torch.float64).index_copy(
        1, torch.tensor([4, 1]), score), 3, [4, 1])


def test_best_choice_without_auc_rows_lets_the_page_use_the_method_own_hyperparameters():
    """An LDS-only run: the noisy-label ranking reuses the best method's configuration
    (a method with required keys, e.g. LoGra's damping, must not get an empty dict)."""
    from dattri.report.bench import best_choice

    rows = [{"setting": "s", "status": "ok", "metric": "lds", "method": "LoGra", "value": v,
             "hyperparameters": {"damping": d, "proj_dim": 256}} for d, v in ((0.1, 0.2), (1e-3, 0.3))]
    choice = best_choice(rows, "s")
    assert choice["method"] == "LoGra" and choice["hyperparameters"]["damping"] == 1e-3
    assert choice["auc_method"] is None and choice["auc_hyperparameters"] is None
