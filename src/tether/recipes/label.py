"""`tether label`: the preference-labeling and side-by-side evaluation page (feedback/server.py)."""

from __future__ import annotations

import getpass
import json
import logging
import webbrowser

from tether.config import LabelConfig
from tether.errors import ConfigError
from tether.feedback.items import read_items
from tether.feedback.labels import LabelFile, summary
from tether.training.launch import setup_logging

log = logging.getLogger("tether")


def default_rater() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "rater"


def print_summary(s: dict) -> None:
    print(json.dumps(s, indent=2))


def run(cfg: LabelConfig) -> dict:
    from tether.feedback.server import LabelApp, serve

    setup_logging()
    items = read_items(cfg.input)  # a bad input fails here, before any page opens
    records = LabelFile(cfg.output).read()
    if cfg.summary:
        s = summary(items, records)
        print_summary(s)
        return s
    rater = cfg.rater or default_rater()
    app = LabelApp(items, cfg.output, rater, seed=cfg.seed)
    try:
        server = serve(app, cfg.host, cfg.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror}); pick another "
                          "--port, or --port 0 for any free one") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"tether label: {len(items)} items, {len(app.done)} already labelled by {rater}; "
          f"labels go to {cfg.output}\nopen {url}  (Ctrl-C to stop)", flush=True)
    if cfg.open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    s = summary(items, LabelFile(cfg.output).read())
    print(f"tether label: stopped; {len(app.done)} of {len(items)} labelled by {rater}")
    return s
