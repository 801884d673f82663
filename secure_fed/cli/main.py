"""``secure-fed``: the command line of the master, the slaves and the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from secure_fed import __version__
from secure_fed.config.settings import validation_problems
from secure_fed.errors import SecureFedError

log = logging.getLogger("secure_fed.cli")

DESCRIPTION = """\
secure-fed trains a neural network from private data that never leaves its owners.
A master sends the model; each slave trains it with differential privacy (Opacus DP-SGD),
encrypts and pairwise-masks its update (TenSEAL, secure aggregation) and sends it over
mutual-TLS websockets; the master adds the ciphertexts and obtains only the sum.

Typical use:
  secure-fed init fed --slaves a,b,c --host master.example.org --schema schema.toml --offline-ca
  secure-fed master fed/master                                   # on the master's machine
  secure-fed slave fed/slaves/a --data clinic.csv                # at each slave
  secure-fed add-slave fed d  /  secure-fed revoke-slave fed b   # change the parties
  secure-fed demo                                                # all of it on 127.0.0.1
See docs/deployment.md for a deployment across organisations.
"""


def _slave_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one slave id, e.g. --slaves a,b,c")
    return names


PROTECTION_HELP = ("how updates are protected: he+mask (encryption and pairwise masking: the "
                   "master obtains only the sum of a round's updates; the default with 3 or "
                   "more slaves), he (homomorphic encryption alone: the master process holds "
                   "the secret key and CAN decrypt each slave's update; the default with 2), "
                   "mask (pairwise masking alone) or plain (the master sees each update; "
                   "baselines only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secure-fed", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"secure-fed {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="count", default=0, help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a federation: CA, certificates, HE keys, bundles",
                       description="Create FED_DIR/master/ (CA, master certificate and key, HE "
                       "secret key, federation.toml) and FED_DIR/slaves/<id>/ for each slave "
                       "(CA certificate, its own certificate and key, the public HE context, "
                       "slave.toml). Copy each slave's folder to that slave's machine; the "
                       "master folder stays with the master. Private keys are written 0600.")
    p.add_argument("fed_dir", type=Path, metavar="FED_DIR")
    p.add_argument("--slaves", type=_slave_list, required=True, metavar="ID,ID,...",
                   help="comma-separated slave ids (lowercase letters, digits, . _ -)")
    p.add_argument("--host", default="127.0.0.1",
                   help="host name or address slaves dial; goes into the master certificate "
                   "(default 127.0.0.1)")
    p.add_argument("--listen", default=None, metavar="ADDR",
                   help="interface the master binds (default: --host)")
    p.add_argument("--port", type=int, default=8765, help="master port (default 8765)")
    p.add_argument("--federation-id", default=None,
                   help="federation name (default: the FED_DIR folder name)")
    p.add_argument("--rounds", type=int, default=10, help="training rounds (default 10)")
    p.add_argument("--min-slaves", type=int, default=None,
                   help="complete updates needed to decrypt a round (default: a majority)")
    p.add_argument("--epsilon", type=float, default=3.0,
                   help="the ε this federation may take from each slave, over all its rounds "
                   "(default 3); each data owner's lifetime budget is set at the slave "
                   "(`secure-fed slave --budget`)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the budget (default 1e-5)")
    p.add_argument("--preset", default="bfv-fast",
                   help="HE parameter preset (default bfv-fast; see `secure-fed bench codec "
                   "--compare`)")
    p.add_argument("--protection", choices=("he", "he+mask", "mask", "plain"), default=None,
                   help=PROTECTION_HELP)
    p.add_argument("--architecture", default="mlp", help="model architecture: a built-in (mlp, "
                   "cnn8) or one an installed package registers (default mlp)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="the architecture's arguments as a JSON object (default: from the schema)")
    p.add_argument("--schema", type=Path, default=None, metavar="FILE.toml",
                   help="the federation's data schema: label column, classes in order, and "
                   "each feature column with its public range (see docs/deployment.md); the "
                   "model's inputs and classes follow from it")
    p.add_argument("--schema-from", type=Path, default=None, metavar="HEADER.csv",
                   help="make the schema from a CSV holding the column names and two rows of "
                   "public bounds, marked 'low' and 'high' in the label column (no records); "
                   "needs --label-column and --classes A,B,...")
    p.add_argument("--label-column", default=None,
                   help="with --schema-from: the column holding the label")
    p.add_argument("--features", type=int, default=None,
                   help="input features of the model (default: the schema's; without one 64, "
                   "the digits images)")
    p.add_argument("--classes", default=None,
                   help="output classes (default: the schema's; without one 10); with "
                   "--schema-from, the label values in class order: A,B,...")
    p.add_argument("--task", choices=("multiclass", "binary", "regression"), default=None,
                   help="what the model predicts (default: the schema's, else multiclass); "
                   "binary reports ROC AUC, regression MSE (see docs/concepts.md)")
    p.add_argument("--target-range", default=None, metavar="LOW,HIGH",
                   help="with --task regression: the target's public bounds (values outside "
                   "are clipped)")
    p.add_argument("--eval-dataset", default=None,
                   help="bundled dataset whose hold-out split the master evaluates on, or "
                   "'none' (default digits; none with --schema or --schema-from). Without a "
                   "schema option its built-in schema is the federation's")
    p.add_argument("--federated-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="slaves measure each committed model on a held-out 20%% of their "
                   "records and release DP-noised counts (10%% of ε); default: on when the "
                   "master has no evaluation data (--eval-dataset none)")
    p.add_argument("--max-records", type=int, default=65536,
                   help="most records one slave may hold; sizes the HE plain modulus "
                   "(default 65536)")
    p.add_argument("--mode", choices=("delta", "gradient", "distill"), default="delta",
                   help="what slaves return each round (default delta); the plan of each mode "
                   "is the demo's (tuned on digits), edit federation.toml to change it")
    p.add_argument("--dp", choices=("local", "distributed"), default="local",
                   help="local: each slave adds the full noise (default); distributed: "
                   "gradient mode under he+mask or mask only, each slave adds σ²/(m − c) of "
                   "the noise variance and the master opens only sums of at least m slaves "
                   "(docs/privacy.md, \"Distributed DP\")")
    p.add_argument("--min-survivors", type=int, default=None, metavar="M",
                   help="distributed DP: the fewest slaves a sum must hold to be opened "
                   "(default: --min-slaves); fewer, and the round is refused")
    p.add_argument("--tolerated-colluders", type=int, default=0, metavar="C",
                   help="distributed DP: slaves that may reveal their noise to the master "
                   "(default 0)")
    p.add_argument("--sample-rate", type=float, default=None, metavar="Q",
                   help="distributed DP: the Poisson rate of every slave (default: batch "
                   "size / --expected-records, at most 1)")
    p.add_argument("--expected-records", type=int, default=None, metavar="N",
                   help="distributed DP: the typical records of one slave, a planning figure "
                   "that sizes the ring (never sent)")
    p.add_argument("--force", action="store_true", help="replace an existing federation")
    p.add_argument("--offline-ca", action="store_true",
                   help="write the CA key to FED_DIR/ca-offline/ instead of the master bundle, "
                   "to be moved to offline storage (add-slave and revoke-slave need it back)")
    p.add_argument("--key-type", choices=("ec", "ed25519"), default="ec",
                   help="key type of the CA and every party: ECDSA P-256 (default) or Ed25519")

    p = sub.add_parser("add-slave", help="add a party, or re-admit a revoked one",
                       description="Issue a new slave certificate from the federation CA, write "
                       "FED_DIR/slaves/ID/ and add ID to the master's federation.toml, without "
                       "touching the other parties. A slave whose certificate is still valid "
                       "must be revoked first. Restart the master to admit the new slave.")
    p.add_argument("fed_dir", type=Path, metavar="FED_DIR")
    p.add_argument("slave_id", metavar="ID")
    p.add_argument("--epsilon", type=float, default=None,
                   help="the most ε the new slave's bundle lets this federation take from it "
                   "(default: the plan's ε); its data owner sets the lifetime budget")
    p.add_argument("--delta", type=float, default=None, help="δ of that ε (default: the plan's)")
    p.add_argument("--key-type", choices=("ec", "ed25519"), default="ec",
                   help="key type of the new certificate (default ec, P-256)")

    p = sub.add_parser("revoke-slave", help="revoke a party's certificate",
                       description="Add the current certificate of slave ID to the master "
                       "bundle's revoked.json and re-sign its CRL. From its next start the "
                       "master refuses that certificate at the TLS handshake (CRL) and right "
                       "after it (revoked.json). `add-slave` re-admits the id with a new "
                       "certificate.")
    p.add_argument("fed_dir", type=Path, metavar="FED_DIR")
    p.add_argument("slave_id", metavar="ID")
    p.add_argument("--reason", default="revoked by the operator",
                   help="why, recorded in revoked.json and in the master's log")

    p = sub.add_parser("master", help="run the master of a federation",
                       description="Serve the slaves of the federation in MASTER_DIR until "
                       "every round is committed. Restarting the same command resumes from the "
                       "last committed round.")
    p.add_argument("bundle", type=Path, metavar="MASTER_DIR")
    p.add_argument("--out", type=Path, default=None,
                   help="where checkpoints, audit.jsonl and summary.json go (default "
                   "MASTER_DIR/run)")
    p.add_argument("--host", default=None, help="interface to bind (default: the bundle's)")
    p.add_argument("--port", type=int, default=None,
                   help="port to bind (default: the bundle's; 0 lets the OS choose)")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the bound port to this file once listening")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="EXPERIMENTS ONLY: serve plain ws:// without TLS; refused unless the "
                   "master binds 127.0.0.1 (or ::1, localhost)")
    p.add_argument("--restart-from-initial-model", action="store_true",
                   help="when no checkpoint in OUT/checkpoints is usable although the run "
                   "committed rounds, run every round again from the initial model (recorded "
                   "in the audit log) instead of refusing to start; no effect while a "
                   "checkpoint is usable")
    p.add_argument("--join-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for the slaves before a round (default: "
                   "join_timeout_s of federation.toml, 600); with fewer than min_slaves "
                   "connected by then the round fails, and with none the master stops")
    p.add_argument("--aggregation-shards", type=int, default=None, metavar="N",
                   help="sum the updates in N shards beside the master and add their sums "
                   "(the same total; default: shards of [aggregation] in federation.toml, 1)")
    p.add_argument("--aggregation-backend", choices=["processes", "ray"], default=None,
                   help="where the shards run: worker processes of the master, or Ray actors "
                   "(pip install 'secure-fed[sim]'; default: backend of [aggregation])")

    p = sub.add_parser("slave", help="take part in a federation as a data owner",
                       description="Connect to the master named in SLAVE_DIR/slave.toml and "
                       "train on private data that never leaves this machine. Give your own "
                       "data with --data FILE_OR_FOLDER (a CSV, Parquet or NPZ table, or a "
                       "folder of images with one subfolder per class; checked against the "
                       "federation's data schema before connecting, and scaled with its public "
                       "ranges), or a bundled "
                       "dataset part with --dataset NAME --partition I/K for trials.")
    p.add_argument("bundle", type=Path, metavar="SLAVE_DIR")
    p.add_argument("--data", default=None, metavar="FILE_OR_FOLDER",
                   help="private data: a CSV, Parquet or NPZ file, a folder of images with one "
                   "subfolder per class, or what --data-source reads")
    p.add_argument("--data-source", default=None, metavar="NAME",
                   help="read --data with the data source NAME that an installed package "
                   "registers (entry-point group secure_fed.datasources)")
    p.add_argument("--check", action="store_true",
                   help="check --data against the federation's schema, say what was found, and "
                   "exit without connecting or spending any budget")
    p.add_argument("--label-column", default=None,
                   help="column of --data holding the label (default: the schema's label column)")
    p.add_argument("--dataset", default=None,
                   help="bundled dataset: digits, breast_cancer, wine, or diabetes (regression)")
    p.add_argument("--partition", default=None, metavar="I/K",
                   help="use part I of K of --dataset's training split (default 0/1)")
    p.add_argument("--budget", type=float, default=None, metavar="EPS",
                   help="this data source's lifetime privacy budget: the most ε (at the "
                   "bundle's δ) its records may ever spend, over every federation. Required "
                   "the first time a data source is used; later it keeps the ledger's value "
                   "unless given again. The bundle's ε is only what this federation asks for")
    p.add_argument("--source-id", default=None, metavar="ID",
                   help="name of this data source; its privacy ledger is found by it, in "
                   "$XDG_DATA_HOME/secure-fed/sources/ID/ (default: 'data-' and a "
                   "fingerprint of the data file's content), so that any bundle over the same "
                   "data spends from the same ledger")
    p.add_argument("--state", type=Path, default=None,
                   help="folder of this data source's privacy ledger (default: the per-user "
                   "folder of --source-id)")
    p.add_argument("--public-count", type=int, default=None, metavar="N",
                   help="declare the exact record count N public: it is then sent as the "
                   "FedAvg weight and used for the sample rate, and recorded as declared "
                   "public in the ledger and the master's audit log. Without it the count "
                   "leaves only as a DP release (a small share of the federation's ε)")
    p.add_argument("--master-url", default=None,
                   help="override the master address of the bundle (wss://host:port)")
    p.add_argument("--workers", type=int, default=None,
                   help="encryption worker processes (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--retry-for", type=float, default=300.0, metavar="SECONDS",
                   help="stop (exit code 2) after this many seconds without reaching the "
                   "master, e.g. when it is not running or refuses this bundle at the TLS "
                   "handshake (default 300)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where local DP-SGD runs: auto (a CUDA GPU when torch sees one, else "
                   "the CPU; the default), cpu, or cuda (refused when there is no GPU)")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="EXPERIMENTS ONLY: allow --master-url ws://127.0.0.1:PORT (no TLS) for "
                   "a master started with --insecure-loopback on this machine")
    p.add_argument("--allow-no-dp", action="store_true",
                   help="BASELINES ONLY: train tasks whose plan turns differential privacy off "
                   "(plain SGD); the ledger then records ε = ∞ and this data source declines "
                   "every DP task afterwards. Without it such tasks are declined")
    p.add_argument("--allow-architecture", action="append", default=[], metavar="NAME",
                   help="also train architecture NAME (repeatable; default: the built-ins only)")

    p = sub.add_parser("demo", help="run a whole federation on 127.0.0.1",
                       description="Create a federation, start one master process and N slave "
                       "processes with the same commands a deployment uses (over TLS, DP-SGD, "
                       "encrypted updates), on a bundled dataset split across the slaves, and "
                       "show a table per round. Slaves' privacy ledgers persist in "
                       "OUT/slaves/<id>/, so a second run spends from what is left.")
    p.add_argument("--slaves", type=int, default=3, help="number of slaves (default 3)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds (default 10; 40 in gradient mode)")
    p.add_argument("--mode", choices=("delta", "gradient", "distill"), default="delta",
                   help="what slaves return: their parameter change after local DP-SGD epochs "
                   "(delta, FedAvg; default), one noisy DP-SGD gradient per round (gradient, "
                   "FedSGD), or a smaller student distilled from the received model under "
                   "DP-SGD, which the master distils back into its model on its own proxy "
                   "split (distill)")
    p.add_argument("--epsilon", type=float, default=3.0, help="ε budget per slave (default 3)")
    p.add_argument("--dataset", default=None, help="bundled dataset (default digits)")
    p.add_argument("--data", default=None, metavar="A.csv,B.csv,...",
                   help="your own tables instead of --dataset, one slave per file (needs "
                   "--label-column); without --schema the schema is derived from the files "
                   "and written to OUT/schema.toml")
    p.add_argument("--label-column", default=None, help="with --data: the label's column")
    p.add_argument("--schema", type=Path, default=None, metavar="FILE.toml",
                   help="with --data: the federation's data schema (as for `init --schema`)")
    p.add_argument("--preset", default="bfv-fast", help="HE preset (default bfv-fast)")
    p.add_argument("--protection", choices=("he", "he+mask", "mask", "plain"), default=None,
                   help=PROTECTION_HELP)
    p.add_argument("--dp", choices=("local", "distributed"), default="local",
                   help="local: every slave adds the full DP noise to its own update (default); "
                   "distributed: gradient mode under he+mask or mask only, each slave adds a "
                   "share of the noise so that the sum the master opens carries it once "
                   "(the accuracy of centralized DP-SGD; every slave must survive each round)")
    p.add_argument("--out", type=Path, default=Path("demo-run"),
                   help="output folder (default demo-run)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="stop everything after this many seconds (default 1800)")

    p = sub.add_parser("bench", help="measure what protection costs",
                       description="Benchmarks of secure_fed. `bench codec` measures bytes and "
                       "seconds of homomorphic encryption against plaintext.")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    b = bench.add_parser("codec", help="encryption overhead per preset",
                         description="Encrypt+serialize, aggregate (deserialize+add) and decrypt "
                         "a random vector under a preset, and report bytes per value, seconds per "
                         "million values and the decoded error. With --compare: plaintext "
                         "float32, compat and every preset in one run.")
    b.add_argument("--size", type=int, default=1_000_000, help="values (default 1000000)")
    b.add_argument("--preset", default=None, help="preset to measure (default bfv-fast)")
    b.add_argument("--scheme", choices=("bfv", "ckks"), default=None,
                   help="measure the default preset of this scheme")
    b.add_argument("--slaves", type=int, default=2, help="updates aggregated (default 2)")
    b.add_argument("--workers", type=int, default=1, help="encryption workers (default 1)")
    b.add_argument("--repeats", type=int, default=1, help="best of this many passes")
    b.add_argument("--compare", action="store_true", help="plaintext, compat and every preset")
    b.add_argument("--json", action="store_true",
                   help="end with one JSON line (an object, or a list with --compare)")
    u = bench.add_parser("utility", help="accuracy of centralized, DP and federated training",
                         description="On one dataset, model and split: train centralized "
                         "without DP, centralized DP-SGD on the pooled data, and a real "
                         "federation (DP-SGD at each slave, encrypted FedAvg over mutual TLS on "
                         "127.0.0.1) at the same ε, once per update mode, and print the "
                         "hold-out accuracies side by side. With --dp: compare FedSGD "
                         "(gradient mode) with local and with distributed DP against "
                         "centralized DP-SGD running the same plan, for each --slaves count. "
                         "Takes a few minutes with the defaults.")
    u.add_argument("--dataset", default="digits", help="bundled dataset (default digits)")
    u.add_argument("--epsilon", type=float, default=3.0, help="ε at δ=1e-5 (default 3)")
    u.add_argument("--slaves", default="3",
                   help="slaves, or a comma list of slave counts to run the comparison at "
                   "(e.g. 3,8,16; default 3)")
    u.add_argument("--rounds", type=int, default=None,
                   help="federation rounds (default: each mode's demo default, 10 or 40; 40 "
                   "with --dp)")
    u.add_argument("--modes", default=None,
                   help="comma-separated update modes to run a federation for "
                   "(default delta,gradient,distill; --dp runs gradient only)")
    u.add_argument("--dp", default=None, metavar="MECHANISMS",
                   help="comma list among local, distributed: compare gradient-mode "
                   "federations with each DP mechanism (distributed: every slave adds a share "
                   "of the noise, all must survive) against centralized DP-SGD on the same "
                   "FedSGD plan (full batches, as many steps as rounds, the same C and lr)")
    u.add_argument("--protection", choices=("he", "he+mask", "mask", "plain"), default=None,
                   help="protection of every federation (default he; mask with --dp, which "
                   "runs under mask or he+mask only: the accuracy does not depend on which, "
                   "and mask is the faster)")
    u.add_argument("--seed", type=int, default=0, help="seed of the split and model")
    u.add_argument("--repeats", type=int, default=None,
                   help="runs of every arm, reported as their mean and each run (default 1; 3 "
                   "with --dp; one DP run varies by a few points with its noise)")
    u.add_argument("--json", action="store_true",
                   help="end with one JSON line (a list when --slaves gives several counts "
                   "without --dp)")
    r = bench.add_parser("round", help="seconds and bytes of a federation round per protection",
                         description="Run a real federation on 127.0.0.1 (mutual TLS, DP-SGD at "
                         "every slave except in the no-dp baseline, one encryption worker per "
                         "slave) for every combination "
                         "of protection mode, HE preset, model size (an MLP on digits) and "
                         "number of slaves, and report seconds per round, update bytes per "
                         "slave and at the master, and model bytes sent to each slave. The "
                         "first round also starts the encryption workers: with --rounds 2 or "
                         "more, it is left out of the mean.")
    r.add_argument("--modes", default="he",
                   help="comma list of modes among no-dp (plaintext FedAvg: no DP, no "
                   "protection; the baseline), plain (DP only), mask (DP + masking), he (DP + "
                   "HE) and he+mask (DP + HE + masking) (default he)")
    r.add_argument("--presets", default="bfv-fast",
                   help="comma list of HE presets for the modes that encrypt (default bfv-fast)")
    r.add_argument("--sizes", default="small,medium",
                   help="comma list of parameter targets (10000, 100k, 1M) or names small "
                   "(10K), medium (100K), large (1M), xlarge (10M) (default small,medium)")
    r.add_argument("--slaves", default="2,4", help="comma list of slave counts (default 2,4)")
    r.add_argument("--dp", default=None, metavar="MECHANISMS",
                   help="comma list among local, distributed: run every federation in "
                   "gradient mode (FedSGD, full batches) with each DP mechanism, to compare "
                   "their bytes per value and round times (distributed: mask and he+mask only, "
                   "at least 3 slaves; the masked values live in the smaller ring distributed "
                   "DP sizes). Without it: delta mode, local DP")
    r.add_argument("--rounds", type=int, default=2, help="rounds per federation (default 2)")
    r.add_argument("--epochs", type=int, default=1, metavar="N",
                   help="local epochs of DP-SGD each slave trains per round (default 1): "
                   "longer training shows how much of a round protection costs once "
                   "training weighs more (not with --dp, whose gradient plan has none)")
    r.add_argument("--seed", type=int, default=0, help="seed of the split and model")
    r.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write round-seconds.png and round-bytes.png into DIR")
    r.add_argument("--wire", action="store_true",
                   help="relay each slave through a loopback relay that counts every byte on "
                   "the wire (TLS, framing, key exchange) and report them per round")
    r.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="keep each federation's keys, checkpoints, summary.json and audit log "
                   "in DIR (default: a temporary folder, removed)")
    r.add_argument("--bandwidth", default="100Mbit", metavar="SPEED",
                   help="each slave's link speed, each direction, for the critical path "
                   "(e.g. 100Mbit, 1Gbit, 12.5MB/s; default 100Mbit)")
    r.add_argument("--json", action="store_true", help="end with one JSON line (a list of rows)")
    r.add_argument("--engine", choices=("process", "ray"), default="process",
                   help="process: master and slaves in this process (default); ray: on Ray "
                   "actors (the sim extra)")

    from secure_fed.cli.audit import add_audit_parser

    add_audit_parser(sub)
    from secure_fed.cli import ledger, plan
    from secure_fed.cli.export import add_parser as add_export_parser

    add_export_parser(sub)
    plan.add_parser(sub)
    ledger.add_parser(sub)
    from secure_fed.cli import simulate
    simulate.add_parser(sub)
    _verbosity_everywhere(parser)
    return parser


VERBOSE_HELP = "more log output (-v info, -vv debug)"
QUIET_HELP = "less log output: errors only"


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v``/``-q`` after every sub-command too (``secure-fed master DIR -v``).

    The sub-commands' copies default to *suppressed*, so that a flag given before the
    sub-command is kept when none follows it.
    """
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in dict.fromkeys(action.choices.values()):
            options = child._option_string_actions
            if not options.keys() & {"-v", "--verbose"}:
                child.add_argument("-v", "--verbose", action="count",
                                   default=argparse.SUPPRESS, help=VERBOSE_HELP)
            if not options.keys() & {"-q", "--quiet"}:
                child.add_argument("-q", "--quiet", action="count",
                                   default=argparse.SUPPRESS, help=QUIET_HELP)
            _verbosity_everywhere(child)


def log_level(verbose: int, quiet: int) -> int:
    """The logging level of ``-v`` (info), ``-vv`` (debug) and ``-q`` (errors only); warnings
    by default."""
    levels = [logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
    return levels[max(0, min(verbose - quiet + 1, len(levels) - 1))]


def setup_logging(level: int) -> None:
    """Log at ``level`` to stderr, so that stdout carries a command's output (its tables,
    its ``--json`` line) and nothing else."""
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False,
                                              rich_tracebacks=False)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secure-fed`` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(log_level(args.verbose, args.quiet))
    from secure_fed.cli import audit, commands

    if args.command == "audit":
        handler = audit.cmd_audit
    elif hasattr(args, "handler"):  # sub-commands in their own module set their handler
        handler = args.handler
    else:
        handler = getattr(commands, f"cmd_{args.command.replace('-', '_')}")
    try:
        code: int = handler(args)
        return code
    except SecureFedError as exc:
        print(f"secure-fed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"secure-fed {args.command}: error: invalid setting: {validation_problems(exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"secure-fed {args.command}: interrupted", file=sys.stderr)
        return 130


def run_async(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
