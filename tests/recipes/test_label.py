"""`tether label`: the label file, the server, and the page itself driven in headless Chromium.

The browser tests need Playwright's Python package (the `dev` extra) and a Chromium: Debian's
`chromium` (CI installs it), `playwright install chromium`, or TETHER_CHROMIUM=/path/to/chrome.
Without one they skip and say which is missing.
"""

import json
import multiprocessing
import os
import re
import shutil
import threading

import pytest

from conftest import write_jsonl
from tether.cli import main
from tether.eval.stats import win_rate
from tether.feedback.items import item_key, read_items
from tether.feedback.labels import LabelFile, agreement, make_record, summary
from tether.feedback.server import LabelApp, serve, shown_order


def pairs_file(path, n=4):
    return write_jsonl(path, [{"prompt": f"Q{i}: say <b>hi</b>", "chosen": f"<script>window.__pwned = {i}</script> yes {i}",
                               "rejected": f"no {i} <img src=x onerror=\"window.__pwned = 1\">"} for i in range(n)])


def read_labels(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- without a browser


def test_items_read_every_input_format_and_key_ignores_order(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "p", "chosen": "x", "rejected": "y"},
        {"prompt": "p", "responses": ["y", "x"]},  # the same comparison again: kept once
        {"prompt": "q", "responses": ["1", "2", "3"], "ranks": [2, 0, 1]},
        {"prompt": "r", "a": "from a", "b": "from b"},
        {"prompt": "s", "chosen": "same", "rejected": "same"},  # nothing to compare
        {"prompt": "t", "response_a": "one", "response_b": "two"},
    ])
    items = read_items(str(src))
    assert [it.prompt for it in items] == ["p", "q", "r", "t"]
    assert items[3].responses == ("one", "two") and items[3].given is None
    assert items[0].given == (0, 1) and items[1].given == (2, 0, 1) and items[2].given is None
    assert items[2].sources == ("a", "b")
    assert item_key("p", ["x", "y"]) == item_key("p", ["y", "x"]) == items[0].key


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "responses": "xy"}], r"in.jsonl:1: 'responses' must be a list"),
    ([{"prompt": "p", "chosen": "x", "rejected": 3}], r"in.jsonl:1: column 'rejected' must be a string"),
    ([{"prompt": "p", "response": "x"}], r"in.jsonl:1: no responses to compare"),
    ([{"text": "x"}], r"has no 'prompt' column; found columns: text"),
])
def test_a_bad_input_file_fails_before_the_page_opens(tmp_path, rows, message, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["label", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--port", "0"]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_output_must_not_be_the_input(tmp_path, capsys):
    src = pairs_file(tmp_path / "in.jsonl")
    assert main(["label", "--input", str(src), "--output", str(src)]) == 2
    assert "must not be --input" in capsys.readouterr().err


def _append_many(path, rater, n):
    item = read_items(str(path.parent / "in.jsonl"))[0]
    for i in range(n):
        LabelFile(path).append([make_record(item, [0, 1], rater, "chose", note="x" * (i * 97 % 5000))])


def test_two_writers_never_corrupt_the_file(tmp_path):
    pairs_file(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(out, name, 150)) for name in ("ann", "bob")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = LabelFile(out).read()  # raises on any torn or interleaved line
    assert sorted(r["rater"] for r in records) == ["ann"] * 150 + ["bob"] * 150


def test_a_cut_off_last_line_loses_only_that_record(tmp_path, caplog):
    items = read_items(str(pairs_file(tmp_path / "in.jsonl")))
    out = tmp_path / "out.jsonl"
    labels = LabelFile(out)
    labels.append([make_record(items[0], [0, 1], "ann", "chose")])
    with open(out, "ab") as fh:  # a crash in the middle of the next write
        fh.write(json.dumps(make_record(items[1], [1, 0], "ann", "chose")).encode()[:40])
    assert [r["item"] for r in labels.read()] == [items[0].key]
    assert "cut-off last line" in caplog.text
    labels.append([make_record(items[2], [1, 0], "ann", "chose")])  # the writer repairs the tail
    assert [r["item"] for r in labels.read()] == [items[0].key, items[2].key]
    assert all(json.loads(line) for line in out.read_text().splitlines())


def _client_app(tmp_path):
    src = pairs_file(tmp_path / "in.jsonl")
    return LabelApp(read_items(str(src)), tmp_path / "out.jsonl", "ann")


def test_the_api_maps_the_shown_side_back_to_the_response(tmp_path):
    from werkzeug.test import Client

    app = _client_app(tmp_path)
    client = Client(app)
    for _ in range(4):
        state = client.get("/api/state").json
        item = app.by_key[state["item"]["key"]]
        order = shown_order(0, "ann", item)
        assert state["item"]["responses"] == [item.responses[i] for i in order]
        right = state["item"]["responses"][1]
        assert client.post("/api/label", json={"key": item.key, "decision": "chose", "choice": 1}).status_code == 200
        record = read_labels(tmp_path / "out.jsonl")[-1]
        assert record["responses"][record["ranks"].index(0)] == right
        assert record["shown"] == order
    assert "summary" in client.get("/api/state").json


def test_the_api_refuses_foreign_hosts_forms_and_unknown_items(tmp_path):
    from werkzeug.test import Client

    app = _client_app(tmp_path)
    app.allowed_hosts = {"127.0.0.1:9"}
    client = Client(app)
    assert client.get("/api/state", headers={"Host": "evil.example:9"}).status_code == 403
    ok = {"Host": "127.0.0.1:9"}
    key = client.get("/api/state", headers=ok).json["item"]["key"]
    assert client.post("/api/label", data={"key": key, "decision": "tie"}, headers=ok).status_code == 400
    assert client.post("/api/label", json={"key": "nope", "decision": "tie"}, headers=ok).status_code == 400
    assert client.post("/api/label", json={"key": key, "decision": "chose", "choice": 2}, headers=ok).status_code == 400
    assert not (tmp_path / "out.jsonl").exists()
    page = client.get("/", headers=ok)
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


def test_labels_train_a_reward_model_and_skips_are_left_out(tiny_models, tmp_path):
    items = read_items(str(pairs_file(tmp_path / "in.jsonl", n=6)))
    out = tmp_path / "labels.jsonl"
    LabelFile(out).append([make_record(it, [0, 1], "ann", "chose") for it in items[:4]]
                          + [make_record(items[4], [0, 0], "ann", "skip"),
                             make_record(items[5], [0, 0], "ann", "tie")])
    from tether.data.preference import read_preference_rows
    from tether.data.io import load_rows

    from collections import Counter
    skipped = Counter()
    rows = read_preference_rows(load_rows(str(out)), str(out), skipped)
    assert len(rows) == 4 and skipped == {"rater_skip": 1, "all_tied": 1}
    assert main(["rm", "--model", str(tiny_models["llama"]), "--data", str(out), "--output-dir",
                 str(tmp_path / "rm"), "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    assert main(["dpo", "--model", str(tiny_models["llama"]), "--data", str(out), "--output-dir",
                 str(tmp_path / "dpo"), "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0


def test_summary_win_rate_and_agreement_by_hand(tmp_path, capsys):
    src = write_jsonl(tmp_path / "sbs.jsonl", [{"prompt": f"p{i}", "a": f"a{i}", "b": f"b{i}"} for i in range(4)])
    items = read_items(str(src))
    out = tmp_path / "out.jsonl"
    a_wins, b_wins, tie = [0, 1], [1, 0], [0, 0]
    ann = [a_wins, a_wins, b_wins, tie]
    bob = [a_wins, b_wins]  # bob labels the first two: agrees on item 0, not on item 1
    LabelFile(out).append([make_record(it, r, "ann", "tie" if r == tie else "chose") for it, r in zip(items, ann)]
                          + [make_record(it, r, "bob", "chose") for it, r in zip(items, bob)])
    s = summary(items, LabelFile(out).read())
    # every rater's last label counts once: a wins 3, ties 1, loses 2
    expected = win_rate([1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1])
    assert s["win_rate_a"] == expected.as_dict()
    assert (expected.wins, expected.ties, expected.losses) == (3, 1, 2)
    # two items labelled twice, one comparison each, one agreement; kappa from the pooled marginals
    assert s["agreement"]["items_labelled_twice"] == 2 and s["agreement"]["agreement"] == 0.5
    # chance agreement: ann said "first better" in 2 of 2, bob in 1 of 2 -> p_e = 2/2 * 1/2 = 0.5,
    # so kappa = (0.5 - 0.5) / (1 - 0.5) = 0
    assert s["agreement"]["cohen_kappa"] == 0.0
    assert main(["label", "--input", str(src), "--output", str(out), "--summary"]) == 0
    assert json.loads(capsys.readouterr().out)["win_rate_a"]["wins"] == 3


def test_eval_writes_side_by_side_pairs_that_label_reads(tiny_models, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("the cat", "a dog")])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": " sat"} for p in ("the cat", "a dog")])
    sbs = tmp_path / "sbs.jsonl"
    assert main(["eval", "--policy-a", str(answers), "--policy-b", str(tiny_models["llama"]), "--prompts",
                 str(prompts), "--output", str(tmp_path / "eval.json"), "--side-by-side", str(sbs),
                 "--response-length", "4", "--no-progress"]) == 0
    items = read_items(str(sbs))
    assert [it.sources for it in items] == [("a", "b")] * len(items) and items[0].responses[0] == " sat"
    assert read_items(str(tmp_path / "eval.json"))[0].sources == ("a", "b")  # its samples list too


CHAT = [{"role": "system", "content": "be <b>kind</b>"},
        {"role": "user", "content": "<script>window.__pwned = 2</script>what is a cat"}]


def chat_pairs_file(path):
    """Conversational pairs as tether bon writes them from chat prompts (TRL's form)."""
    return write_jsonl(path, [{"prompt": CHAT, "chosen": [{"role": "assistant", "content": "a <i>cat</i>"}],
                               "rejected": [{"role": "assistant", "content": "no idea"}]},
                              {"prompt": CHAT[1:], "chosen": [{"role": "assistant", "content": "plain"}],
                               "rejected": [{"role": "assistant", "content": "another"}]}])


def test_conversational_items_keep_their_messages_through_the_api(tmp_path, chat_model):
    from werkzeug.test import Client

    items = read_items(str(chat_pairs_file(tmp_path / "in.jsonl")))
    assert [it.prompt for it in items] == [CHAT, CHAT[1:]] and all(it.chat for it in items)
    assert items[0].responses == ("a <i>cat</i>", "no idea") and items[0].given == (0, 1)
    assert item_key(CHAT, ["x", "y"]) == item_key([{"content": m["content"], "role": m["role"]} for m in CHAT],
                                                 ["y", "x"])
    app = LabelApp(items, tmp_path / "out.jsonl", "ann")
    client = Client(app)
    for prompt in (CHAT, CHAT[1:]):
        state = client.get("/api/state").json
        assert state["item"]["prompt"] == prompt
        assert client.post("/api/label", json={"key": state["item"]["key"], "decision": "chose",
                                               "choice": 0}).status_code == 200
    records = read_labels(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in records] == [CHAT, CHAT[1:]]
    assert main(["label", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--summary"]) == 0
    # tether rm reads the labels as conversations, rendered in the model's chat template
    from tether.data.io import load_rows
    from tether.data.preference import read_preference_rows
    from tether.models.load import load_tokenizer

    tok = load_tokenizer(str(chat_model))
    rows = read_preference_rows(load_rows(str(tmp_path / "out.jsonl")), "out", tokenizer=tok)
    assert rows[0]["chat"] and rows[0]["prompt"].startswith("<|im_start|>system\nbe <b>kind</b><|im_end|>\n"
                                                            "<|im_start|>user\n<script>")


# ----------------------------------------------------------------------------- in Chromium


def _chromium() -> str | None:
    found = os.environ.get("TETHER_CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed "
                                   "(pip install -e '.[dev]'); the page's browser tests need it")
    path = _chromium()
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path) if path else p.chromium.launch()
        except Exception as err:
            pytest.skip(f"no Chromium to drive (apt-get install chromium, or `playwright install "
                        f"chromium`, or set TETHER_CHROMIUM): {str(err).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page_server(tmp_path):
    servers = []

    def start(src, out, rater="ann"):
        app = LabelApp(read_items(str(src)), out, rater)
        server = serve(app, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _wait_item(page, n, total):
    from playwright.sync_api import expect

    expect(page.locator("#progress-text")).to_have_text(f"item {n} of {total}")


def test_label_pairs_by_click_and_key_with_a_reload_midway(browser, page_server, tiny_models, tmp_path):
    from playwright.sync_api import expect

    src, out = pairs_file(tmp_path / "in.jsonl", n=5), tmp_path / "labels.jsonl"
    url = page_server(src, out)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    _wait_item(page, 1, 5)
    # markup in the data shows as text and runs nothing
    expect(page.locator("#prompt")).to_have_text("Q0: say <b>hi</b>")
    assert "<script>" in page.locator("#responses").inner_text()
    assert page.evaluate("() => window.__pwned") is None
    shown = page.locator(".response").all_inner_texts()
    page.click("#left")  # 1: by click
    _wait_item(page, 2, 5)
    page.click("input[value=much]")
    page.fill("#note", "left is rude")
    second = page.locator(".response").all_inner_texts()
    page.click("#right")  # 2: by click, with strength and note
    _wait_item(page, 3, 5)
    page.keyboard.press("z")  # 3: by keys, slightly better, left
    page.keyboard.press("ArrowLeft")
    _wait_item(page, 4, 5)
    page.reload()  # mid-way: the page comes back at the next unlabelled item
    _wait_item(page, 4, 5)
    page.keyboard.press("n")  # typing a note does not trigger the shortcuts
    page.keyboard.type("tst")
    page.keyboard.press("Escape")
    page.keyboard.press("t")  # 4: tie
    _wait_item(page, 5, 5)
    page.keyboard.press("s")  # 5: skip
    expect(page.locator("#finished")).to_be_visible()
    expect(page.locator("#progress-text")).to_have_text("5 of 5 labelled")
    assert not errors
    records = read_labels(out)
    assert [r["decision"] for r in records] == ["chose", "chose", "chose", "tie", "skip"]
    assert records[0]["responses"][records[0]["ranks"].index(0)] == shown[0]
    assert records[1]["responses"][records[1]["ranks"].index(0)] == second[1]
    assert (records[1]["strength"], records[1]["note"]) == ("much", "left is rude")
    assert (records[2]["strength"], records[3]["note"]) == ("slightly", "tst")
    assert all(r["rater"] == "ann" and r["time"] and sorted(r["shown"]) == [0, 1] for r in records)
    assert main(["rm", "--model", str(tiny_models["llama"]), "--data", str(out), "--output-dir",
                 str(tmp_path / "rm"), "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0",
                 "--no-progress", "--no-tensorboard"]) == 0
    page.close()


def test_rank_k_responses_by_keys_and_clicks(browser, page_server, tmp_path):
    from playwright.sync_api import expect

    src = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "rank", "responses": ["r0", "r1", "r2", "r3"]},
                                             {"prompt": "again", "responses": ["s0", "s1", "s2"]}])
    out = tmp_path / "labels.jsonl"
    page = browser.new_page()
    page.goto(page_server(src, out))
    _wait_item(page, 1, 2)
    shown = page.locator(".response").all_inner_texts()
    expect(page.locator("#submit-ranking")).to_be_disabled()
    for key in ("3", "1", "Backspace", "4", "1"):  # 3 > 4 > 1 > (2 implied)
        page.keyboard.press(key)
    expect(page.locator("#ranking")).to_have_text("3 > 4 > 1 > 2")
    page.keyboard.press("Enter")
    _wait_item(page, 2, 2)
    cards = page.locator(".card")
    second = page.locator(".response").all_inner_texts()
    cards.nth(2).click()
    cards.nth(0).click()
    page.click("#submit-ranking")
    expect(page.locator("#finished")).to_be_visible()
    first, last = read_labels(out)
    best_first = [shown[2], shown[3], shown[0], shown[1]]
    assert [first["responses"][first["ranks"].index(k)] for k in range(4)] == best_first
    assert first["decision"] == "ranked"
    assert [last["responses"][last["ranks"].index(k)] for k in range(3)] == [second[2], second[0], second[1]]
    page.close()


def test_two_raters_then_the_evaluation_figures_on_the_page(browser, page_server, tmp_path):
    from playwright.sync_api import expect

    src = write_jsonl(tmp_path / "sbs.jsonl", [{"prompt": f"p{i}", "a": f"policy a {i}", "b": f"policy b {i}"}
                                               for i in range(3)])
    out = tmp_path / "labels.jsonl"
    for rater in ("ann", "bob"):  # each picks policy a every time, wherever it is shown
        page = browser.new_page()
        page.goto(page_server(src, out, rater))
        for n in range(1, 4):
            _wait_item(page, n, 3)
            side = 0 if page.locator(".response").nth(0).inner_text().startswith("policy a") else 1
            page.keyboard.press(str(side + 1))
        expect(page.locator("#finished")).to_be_visible()
        text = page.locator("#summary").inner_text()
        page.close()
    assert "win rate of a\t100.0%" in text and "6 / 0 / 0" in text
    assert "inter-rater agreement\t100.0%" in text
    assert agreement(LabelFile(out).read())["items_labelled_twice"] == 3


def test_agreement_with_the_order_the_input_gave(tmp_path):
    items = read_items(str(pairs_file(tmp_path / "in.jsonl", n=4)))  # chosen over rejected
    records = [make_record(items[0], [0, 1], "ann", "chose"),  # agrees
               make_record(items[1], [1, 0], "ann", "chose"),  # disagrees
               make_record(items[2], [0, 0], "ann", "tie"),  # a tie is not the given order
               make_record(items[3], [0, 0], "ann", "skip")]  # a skip is left out
    from tether.feedback.labels import agreement_with_given

    assert agreement_with_given(items, records) == {"comparisons": 3, "agreement": 1 / 3}


def test_a_conversation_shows_turn_by_turn_as_text(browser, page_server, tmp_path):
    from playwright.sync_api import expect

    src, out = chat_pairs_file(tmp_path / "in.jsonl"), tmp_path / "labels.jsonl"
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server(src, out))
    _wait_item(page, 1, 2)
    # one block per message: its role, then its content, markup shown as text and never run
    expect(page.locator("#prompt .turn .role")).to_have_text(["system", "user"])
    expect(page.locator("#prompt .turn .content")).to_have_text([m["content"] for m in CHAT])
    assert page.locator("#prompt b, #prompt script").count() == 0
    assert page.evaluate("() => window.__pwned") is None
    assert sorted(page.locator(".response").all_inner_texts()) == ["a <i>cat</i>", "no idea"]
    page.keyboard.press("1")
    _wait_item(page, 2, 2)
    expect(page.locator("#prompt .turn .role")).to_have_text(["user"])
    page.keyboard.press("t")
    expect(page.locator("#finished")).to_be_visible()
    assert not errors
    records = read_labels(out)
    assert [r["prompt"] for r in records] == [CHAT, CHAT[1:]]
    assert [r["decision"] for r in records] == ["chose", "tie"]
    page.close()
