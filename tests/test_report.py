"""The full pipelines' report: mean ± sample std (n) over seeds, published and CRD figures beside ours."""

import csv
import json

import yaml

from kdpipe import config, published, report

from .conftest import ROOT


def fake_manifest(dataset, train_size, test_size, num_classes):
    return config.Manifest(dataset=dataset, source="x", num_classes=num_classes, classes=[str(c) for c in range(num_classes)],
                           train_size=train_size, test_size=test_size, image_size=32, augment="cifar", storage="memory",
                           mean=[0.5] * 3, std=[0.25] * 3, sha256={})


def fake_run(tmp_path, name, top1, epochs=2):
    for d in ("metrics", "plots"):  # a library model's name has a folder part: tv/resnet34
        (tmp_path / d / name).parent.mkdir(parents=True, exist_ok=True)
    m = {"top1": top1, "top5": 90.0, "top1_last": top1 - 1, "best_epoch": 1, "params_m": 0.27, "epochs": epochs,
         "seconds": 1.0}
    (tmp_path / f"metrics/{name}.json").write_text(json.dumps(m))
    with (tmp_path / f"plots/{name}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "test_top1"])
        for e in range(1, epochs + 1):
            w.writerow([e, top1 - epochs + e])


def test_grid_report(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines/cifar100/params.yaml").read_text())
    raw.update(seeds=[0, 1], methods=["kd", "fsp", "dkd"], models=["resnet20", "resnet56"], published=[],
               pairs=[{"teacher": "resnet56", "student": "resnet20"}], table_models=["resnet56"])
    p = config.validate(raw)
    for seed, (t, s, kd) in enumerate([(72.0, 68.0, 70.0), (74.0, 70.0, 71.0)]):
        fake_run(tmp_path, f"repdistiller-resnet56-s{seed}", t)
        fake_run(tmp_path, f"repdistiller-resnet20-s{seed}", s)
        fake_run(tmp_path, f"kd-resnet56-resnet20-s{seed}", kd)
        fake_run(tmp_path, f"he2016-resnet56-s{seed}", t + 1)  # the ResNet table: another recipe, another run
    fake_run(tmp_path, "fsp-resnet56-resnet20-s0", 69.5)  # one seed missing: n=1
    fake_run(tmp_path, "dkd-resnet56-resnet20-s0", 71.0)
    fake_run(tmp_path, "kd+ls-resnet56-resnet20-s0", 72.0)  # a variant's run (params' variants.ls)
    manifest = fake_manifest("cifar100", 50000, 10000, 100)
    text = report.grid(p, manifest, tmp_path / "metrics", tmp_path / "plots", tmp_path / "reports")
    table_part, models_part = text.split("## Teachers and students' baselines")
    # the ResNet table (he2016 runs): ResNet-56 mean 74 ± sqrt(2) over 2 seeds vs the ResNet table's CIFAR-100 71.09 / 91.56,
    # best-epoch Top1 and last-epoch Top5 as that table
    he = "`he2016` (164 epochs, batch 128, SGD lr 0.1 x0.1 at epochs 82/123, wd 0.0001)"
    assert f"## The ResNet table\n\nOur numbers: recipe {he}. Top1 = best epoch's" in table_part
    assert "| ResNet-56 | 0.27 | 74.00 ± 1.41 (n=2) | 90.00 ± 0.00 (n=2) | 73.00 ± 1.41 (n=2) | 71.09 / 91.56 | +2.91 |" \
        in table_part
    # CRD's models (repdistiller runs) beside CRD's own figures for them, last epoch vs last epoch
    assert "| ResNet-56 | 0.27 | 73.00 ± 1.41 (n=2) | 90.00 ± 0.00 (n=2) | 72.00 ± 1.41 (n=2) | 72.34 | -0.34 |" in models_part
    assert "| ResNet-20 | 0.27 | 69.00 ± 1.41 (n=2) | 90.00 ± 0.00 (n=2) | 68.00 ± 1.41 (n=2) | 69.06 | -1.06 |" in models_part
    assert "71.09" not in models_part  # the he2016 figures are never compared with repdistiller runs
    # the distillation grid compares like with like: our last epoch (top1_last = top1 - 1 here) with CRD's last epoch
    assert "| Teacher | 72.00 ± 1.41 (n=2) [72.34] |" in text
    assert "| Student (baseline) | 68.00 ± 1.41 (n=2) [69.06] |" in text
    assert "| KD | 69.50 ± 0.71 (n=2) [70.66] |" in text
    assert "| FSP | 68.50 ± 0.00 (n=1) [69.95] |" in text
    # DKD's published figure (mdistiller) does not say best or last: compared with our best epoch, marked †
    assert "| DKD † | 71.00 ± 0.00 (n=1) [71.97] |" in text and "† DKD:" in text
    assert "the mean of 5 runs" in text.split("† DKD:")[1]  # the footnote says how many runs the figure averages
    # the variants (params' variants.ls) are rows of their own beside logit-standardization-KD's README figures
    # (KD+Ours, ResNet56 -> ResNet20: 71.43), compared at the best epoch
    assert "| KD+LS † | 72.00 ± 0.00 (n=1) [71.43] |" in text and "| MLKD+LS † | – [72.33] |" in text
    assert "† KD+LS: in brackets the README's KD+LS figure" in text
    # each table says which recipe produced our numbers and which convention it uses
    recipe = ("`repdistiller` (240 epochs, batch 64, SGD lr 0.05 x0.1 at epochs 150/180/210, wd 0.0005; "
              "lr 0.01 for mobilenetv2, shufflev1, shufflev2)")
    models_part, distill_part = models_part.split("## Distillation")
    assert f"Our numbers: recipe {recipe}. Beside them CRD's figures" in models_part
    assert f"Our numbers: recipe {recipe} for the students" in distill_part
    assert "**last** epoch (`top1_last`), the convention of CRD and RepDistiller" in distill_part
    for f in ("results.md", "accuracy.png", "delta.png"):
        assert (tmp_path / "reports" / f).stat().st_size > 0


def test_stats():
    assert report.stats([]) is None
    assert report.stats([5.0]) == (5.0, 0.0, 1)
    mean, std, n = report.stats([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4) and abs(std - (5 / 3) ** 0.5) < 1e-12  # sample std (n - 1)


def test_grid_report_crd_pairs_published_teachers_and_na(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines/cifar100/params.yaml").read_text())
    raw.update(seeds=[0], methods=["kd", "fsp", "dkd", "dist"], models=["shufflev1"], published=["wrn_40_2"],
               pairs=[{"teacher": "wrn_40_2", "student": "shufflev1"}, {"teacher": "resnet32x4", "student": "shufflev1"}])
    p = config.validate(raw)
    raw["table_models"] = []
    p = config.validate(raw)
    fake_run(tmp_path, "repdistiller-wrn_40_2-s0", 76.0)
    fake_run(tmp_path, "repdistiller-shufflev1-s0", 71.0)
    fake_run(tmp_path, "kd-wrn_40_2-shufflev1-s0", 75.0)
    fake_run(tmp_path, "dkd-wrn_40_2-shufflev1-s0", 76.5)
    fake_run(tmp_path, "dist-resnet32x4-shufflev1-s0", 76.0)
    (tmp_path / "metrics/fsp-wrn_40_2-shufflev1-s0.json").write_text(json.dumps({"not_applicable": "fsp needs ..."}))
    manifest = fake_manifest("cifar100", 50000, 10000, 100)
    text = report.grid(p, manifest, tmp_path / "metrics", tmp_path / "plots", tmp_path / "reports")
    assert "| WRN-40-2 (published) |" in text and "| ShuffleNetV1 |" in text
    assert "| Method | WRN-40-2 → ShuffleNetV1 | ResNet-32x4 → ShuffleNetV1 |" in text
    assert "| Teacher | 75.00 ± 0.00 (n=1) [75.61] | – [79.42] |" in text  # CRD's README, cross-family table
    assert "| KD | 74.00 ± 0.00 (n=1) [74.83] | – [74.07] |" in text
    assert "| FSP | N/A | – |" in text  # RepDistiller: N/A across families; no CRD figure either
    assert "| DKD † | 76.50 ± 0.00 (n=1) [76.70] | – [76.45] |" in text  # mdistiller's README
    # DIST's README: no figure for WRN-40-2 -> ShuffleNetV1; last epoch (its epoch is not stated), its own note
    assert "| DIST † | – | 75.00 ± 0.00 (n=1) [76.34] |" in text and "† DKD: in brackets mdistiller's" in text
    assert "† DIST: in brackets DIST's README figure" in text


def test_crd_figures_cover_the_13_pairs():
    assert len(published.CRD) == 13 and all(len(v) >= 14 for v in published.CRD.values())
    assert published.CRD[("resnet32x4", "resnet8x4")]["crd"] == 75.51 and "fsp" not in published.CRD[("wrn_40_2", "wrn_40_1")]
    dkd, dist = published.METHOD_FIGURES["dkd"], published.METHOD_FIGURES["dist"]
    assert set(dkd) <= set(published.CRD) and len(dkd) == 11 and set(dist) <= set(published.CRD) and len(dist) == 6
    # a model's teacher or student figure is the same in every pair it appears in (CRD_MODELS takes one)
    for (t, s), col in published.CRD.items():
        assert published.CRD_MODELS[t] == col["teacher"] and published.CRD_MODELS[s] == col["student"]


def test_cifar10_grid_reads_the_table_runs_as_teachers_and_baselines(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines/cifar10/params.yaml").read_text())
    raw.update(seeds=[0], methods=["kd"], table_models=["resnet20", "resnet56"],
               pairs=[{"teacher": "resnet56", "student": "resnet20"}])
    p = config.validate(raw)
    fake_run(tmp_path, "he2016-resnet56-s0", 93.0)
    fake_run(tmp_path, "he2016-resnet20-s0", 91.0)
    fake_run(tmp_path, "kd-resnet56-resnet20-s0", 92.0)
    manifest = fake_manifest("cifar10", 50000, 10000, 10)
    text = report.grid(p, manifest, tmp_path / "metrics", tmp_path / "plots", tmp_path / "reports")
    assert "| ResNet-56 | 0.27 | 93.00 ± 0.00 (n=1) | 90.00 ± 0.00 (n=1) | 92.00 ± 0.00 (n=1) | 93.63 / 99.75 | -0.63 |" in text
    assert "## Teachers and students' baselines" not in text  # models: [], published: []
    assert "| Teacher | 92.00 ± 0.00 (n=1) |" in text and "| Student (baseline) | 90.00 ± 0.00 (n=1) |" in text
    assert "| KD | 91.00 ± 0.00 (n=1) |" in text


def test_published_figures_come_with_source_and_convention():
    ref = yaml.safe_load(published.PUBLISHED_FILE.read_text())
    assert set(ref) == {"he2016", "crd", "dkd", "dist", "ctkd", "reviewkd", "dot", "mlkd", "wttm", "sdd", "wkd",
                        "kd+ls", "dkd+ls", "mlkd+ls", "imagenet"} and all(t["source"] and t["convention"] for t in ref.values())
    # ImageNet: DKD's table, best epoch; each pair's teacher and student rows and the methods' [Top-1, Top-5]
    assert ref["imagenet"]["metric"] == "top1" and "best epoch" in ref["imagenet"]["convention"]
    assert published.IMAGENET[("tv/resnet34", "tv/resnet18")]["dkd"] == [71.70, None]
    assert published.IMAGENET_MODELS == {"tv/resnet34": [73.31, 91.42], "tv/resnet18": [69.76, 89.08],
                                      "tv/resnet50": [76.16, 92.86], "mobilenetv1": [68.87, 88.76]}
    assert published.PUBLISHED["resnet110"] == (1.73, 1.74, 93.77, 99.78, 71.85, 91.36)  # the ResNet table (the project's targets)
    assert published.published("resnet20", "cifar100") == (67.86, 90.11)
    # each method is compared on the metric its published figures use: CRD's last epoch, unless the method
    # has a table of its own that says otherwise (DKD: mdistiller's best epoch)
    assert ref["crd"]["metric"] == "top1_last" and published.METHOD_TABLES["dkd"]["metric"] == "top1"
    assert set(published.METHOD_TABLES) == {"dkd", "dist", "ctkd", "reviewkd", "dot", "mlkd", "wttm", "sdd", "wkd",
                                            "kd+ls", "dkd+ls", "mlkd+ls"}
    # a table's method is a method, or a variant row of the CIFAR-100 pipeline (`<method>+<tag>`)
    rows = config.load_params(ROOT / "pipelines/cifar100/params.yaml").rows()
    assert set(published.METHOD_TABLES) <= set(rows) and set(config.METHODS) <= set(rows)
    # logit-standardization-KD's README, KD+Ours row, ResNet32x4 -> ResNet8x4 and VGG13 -> MobileNetV2
    assert published.METHOD_FIGURES["kd+ls"][("resnet32x4", "resnet8x4")] == 76.62
    assert published.METHOD_FIGURES["mlkd+ls"][("vgg13", "mobilenetv2")] == 70.94
    assert all(t["note"] and t["source"] and t["convention"] for t in published.METHOD_TABLES.values())


def test_grid_report_imagenet_beside_dkds_table(tmp_path):
    # ImageNet: published figures are the best epoch's (mdistiller), so our best-epoch Top-1 comes first with them
    # in brackets, then the last epoch's Top-1 and Top-5; the teachers' and baselines' rows carry Top-1 / Top-5
    raw = yaml.safe_load((ROOT / "pipelines/imagenet/params.yaml").read_text())
    raw.update(methods=["kd", "fsp", "dkd"])
    p = config.validate(raw)
    for model, top1 in (("tv/resnet34", 73.3), ("tv/resnet50", 76.1), ("tv/resnet18", 69.0), ("mobilenetv1", 68.0)):
        fake_run(tmp_path, f"imagenet-{model}-s0", top1)
    fake_run(tmp_path, "kd-tv/resnet34-tv/resnet18-s0", 71.0)
    fake_run(tmp_path, "dkd-tv/resnet50-mobilenetv1-s0", 72.5)
    (tmp_path / "metrics/fsp-tv/resnet50-mobilenetv1-s0.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "metrics/fsp-tv/resnet50-mobilenetv1-s0.json").write_text(json.dumps({"not_applicable": "fsp ..."}))
    manifest = fake_manifest("imagenet", 1281167, 50000, 1000)
    text = report.grid(p, manifest, tmp_path / "metrics", tmp_path / "plots", tmp_path / "reports")
    assert "| tv/resnet50 (published) | 0.27 | 76.10 ± 0.00 (n=1) | 90.00 ± 0.00 (n=1) | 75.10 ± 0.00 (n=1) | " \
           "76.16 / 92.86 | -0.06 |" in text
    assert "| tv/resnet18 | 0.27 | 69.00 ± 0.00 (n=1) | 90.00 ± 0.00 (n=1) | 68.00 ± 0.00 (n=1) | 69.76 / 89.08 | -0.76 |" in text
    best, last, top5 = text.split("## Distillation")[1:]
    assert best.startswith(" (Top-1 %, best epoch)") and last.startswith(" (Top-1 %, last epoch)")
    assert "| KD | 71.00 ± 0.00 (n=1) [71.03] | – [70.50] |" in best  # mdistiller's KD (T 1) figures
    assert "| DKD | – [71.70] | 72.50 ± 0.00 (n=1) [72.05] |" in best  # no † here: the whole table is best-epoch
    assert "| FSP | – | N/A |" in best and "| KD | 70.00 ± 0.00 (n=1) | – |" in last
    assert "| Teacher | 90.00 ± 0.00 (n=1) [91.42] | 90.00 ± 0.00 (n=1) [92.86] |" in top5  # torchvision's, OFD's
    assert "| KD | 90.00 ± 0.00 (n=1) | – |" in top5  # no published Top-5 for KD


def test_grid_marks_collapsed_runs(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines/cifar100/params.yaml").read_text())
    raw.update(seeds=[0], methods=["kd"], models=["resnet20", "resnet56"], published=[], table_models=[],
               pairs=[{"teacher": "resnet56", "student": "resnet20"}])
    p = config.validate(raw)
    for name, top1 in (("repdistiller-resnet56-s0", 72.0), ("repdistiller-resnet20-s0", 68.0),
                       ("kd-resnet56-resnet20-s0", 1.0)):
        fake_run(tmp_path, name, top1)
    f = tmp_path / "metrics/kd-resnet56-resnet20-s0.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "warning": "predicts one class ('apple') for all 10000 "
                                                                     "test images"}))
    manifest = fake_manifest("cifar100", 50000, 10000, 100)
    text = report.grid(p, manifest, tmp_path / "metrics", tmp_path / "plots", tmp_path / "reports")
    assert "| KD | 0.00 ± 0.00 (n=1) [70.66] ⚠ |" in text and "| Teacher | 71.00 ± 0.00 (n=1) [72.34] |" in text
    assert "\n⚠ kd-resnet56-resnet20-s0: predicts one class ('apple') for all 10000 test images\n" in text
    assert text.count("⚠") == 2
