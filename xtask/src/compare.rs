//! `cargo xtask compare`: several `cmoe train` runs with one preset, and their reports put in
//! one table: a free list of runs, the paper's Table 1 (`--paper`: every method, Immediate and
//! Last rows, Mean, BWT, trainable parameters per task), or its ablation tables
//! (`--ablations`: Tables 2 to 5). A run already under `--out` is reused if finished and
//! resumed if killed, both only when it was made with the same settings.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

/// A run: `method[:flag=value...]` (e.g. `cmoe:plan=every-layer`).
#[derive(Debug, Clone)]
pub struct RunSpec(pub String);

impl RunSpec {
    /// The run's folder name and its `cmoe train` flags.
    fn name_and_flags(&self, preset: &str) -> (String, Vec<String>) {
        let mut parts = self.0.split(':');
        let method = parts.next().unwrap_or("cmoe");
        let mut name = format!("compare-{preset}-{method}");
        let mut flags = vec![
            "--preset".to_string(),
            preset.to_string(),
            "--method".to_string(),
            method.to_string(),
        ];
        for part in parts {
            let (flag, value) = part.split_once('=').unwrap_or((part, ""));
            name.push_str(&format!("-{flag}-{value}"));
            flags.push(format!("--{flag}"));
            flags.push(value.to_string());
        }
        flags.push("--name".into());
        flags.push(name.clone());
        (name, flags)
    }
}

/// Where and how the runs go.
pub struct Runner<'a> {
    /// Runs `cmoe train` with these flags (the backend's binary, built once).
    pub train: &'a dyn Fn(&[String]) -> anyhow::Result<()>,
    /// Runs `cmoe plot` on a comparison's JSON (its figures go beside it).
    pub plot: &'a dyn Fn(&Path) -> anyhow::Result<()>,
    /// Size preset.
    pub preset: &'a str,
    /// Backend name (for the tables' captions).
    pub backend: &'a str,
    /// Where the runs and tables go.
    pub out: &'a Path,
    /// Seeds of the free comparison: each run is made once per seed and the table gives the
    /// mean and standard deviation over them.
    pub seeds: &'a [u64],
}

impl Runner<'_> {
    /// The report of `spec`'s run: the run is made, or, when its folder holds one, resumed.
    /// `cmoe train --resume` refuses a run made with other settings (naming them), so a report
    /// left by an older preset is never mixed in; a finished run only has its report rewritten.
    fn report(&self, spec: &RunSpec) -> anyhow::Result<Value> {
        let (name, mut flags) = spec.name_and_flags(self.preset);
        let dir = self.out.join(&name);
        let path = dir.join("report.json");
        flags.extend(["--runs".to_string(), self.out.display().to_string()]);
        if dir.join("run.json").exists() {
            eprintln!("== {} == (resuming or reusing {})", spec.0, dir.display());
            flags.push("--resume".into());
        } else {
            eprintln!("== {} ==", spec.0);
        }
        (self.train)(&flags).with_context(|| {
            format!(
                "run `{}` in {} (a run made there with other settings is refused: move it \
                 or pass another --out)",
                spec.0,
                dir.display()
            )
        })?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))
    }

    /// Writes `name`.md and `name`.json under `out` and prints the Markdown.
    fn write(&self, name: &str, markdown: &str, json: &Value) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.out)?;
        let md = self.out.join(format!("{name}.md"));
        std::fs::write(&md, markdown).with_context(|| format!("cannot write {}", md.display()))?;
        let path = self.out.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{markdown}");
        eprintln!("wrote {} and {}", md.display(), path.display());
        Ok(())
    }

    /// The free comparison: one summary row per run, over every seed of `seeds` (mean and
    /// sample standard deviation when there are several).
    pub fn runs(&self, specs: &[RunSpec]) -> anyhow::Result<()> {
        let seeds = match self.seeds {
            [] => &[0][..],
            s => s,
        };
        let mut md = format!(
            "# Mini-CoIN comparison ({} preset, {}, seeds {seeds:?})\n\n| run | mean immediate | mean last | BWT | PTL accuracy | trainable params per task (mean) | wall s |\n|---|---|---|---|---|---|---|\n",
            self.preset, self.backend
        );
        let mut rows = Vec::new();
        for spec in specs {
            // Seed 0 is the run as named (so the default run is shared); others add `seed=N`.
            let reports: Vec<Value> = seeds
                .iter()
                .map(|&seed| match seed {
                    0 => self.report(spec),
                    _ => self.report(&RunSpec(format!("{}:seed={seed}", spec.0))),
                })
                .collect::<anyhow::Result<_>>()?;
            let stat = |key: &str, decimals: usize| spread(&reports, |r| r[key].as_f64(), decimals);
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                spec.0,
                stat("mean_immediate", 2),
                stat("mean_last", 2),
                stat("bwt", 2),
                stat("ptl_accuracy", 3),
                spread(&reports, mean_params_value, 0),
                stat("wall_seconds", 0)
            ));
            rows.push(json!({ "run": spec.0, "seeds": seeds, "reports": reports }));
        }
        if seeds.len() > 1 {
            md.push_str(&format!(
                "\nEach cell: mean ± sample standard deviation over the {} seeds.\n",
                seeds.len()
            ));
        }
        let name = format!("compare-{}", self.preset);
        self.write(
            &name,
            &md,
            &json!({ "preset": self.preset, "backend": self.backend, "runs": rows }),
        )?;
        (self.plot)(&self.out.join(format!("{name}.json")))
    }

    /// The paper's Table 1: Multitask, then every method's Immediate row, then every method's
    /// Last row with BWT, and the trainable parameters per task.
    pub fn paper(&self) -> anyhow::Result<()> {
        // LLaVA-CMoE's run first (the one to look at while the others run), the table in the
        // paper's order.
        self.report(&RunSpec("cmoe".into()))?;
        let methods = ["lora", "moelora", "ewc", "lwf", "cmoe"];
        let multitask = self.report(&RunSpec("multitask".into()))?;
        let reports: Vec<(&str, Value)> = methods
            .iter()
            .map(|m| Ok((*m, self.report(&RunSpec((*m).into()))?)))
            .collect::<anyhow::Result<_>>()?;
        let tasks = task_names(&multitask);
        let mut md = format!(
            "# Table 1 on Mini-CoIN ({} preset, {})\n\n| Setting | Method | {} | Mean | BWT | trainable params per task |\n|---|---|{}---|---|---|\n",
            self.preset,
            self.backend,
            tasks.join(" | "),
            "---|".repeat(tasks.len())
        );
        let mut rows = Vec::new();
        let mut row = |setting: &str, method: &str, r: &Value, key: &str, bwt: bool| {
            let values = per_task(r, key, &tasks);
            md.push_str(&format!(
                "| {setting} | {} | {} | {} | {} | {} |\n",
                paper_name(method),
                cells(&values),
                number(&r[&format!("mean_{key}")], 2),
                if bwt { number(&r["bwt"], 2) } else { "".into() },
                mean_params(r)
            ));
            rows.push(json!({
                "setting": setting,
                "method": paper_name(method),
                "accuracy": values,
                "mean": r[&format!("mean_{key}")],
                "bwt": if bwt { r["bwt"].clone() } else { Value::Null },
                "trainable_params_per_task": mean_params_value(r),
                "ptl_accuracy": r["ptl_accuracy"],
            }));
        };
        row("Multitask", "multitask", &multitask, "last", false);
        for (method, r) in &reports {
            row("Immediate", method, r, "immediate", false);
        }
        for (method, r) in &reports {
            row("Last", method, r, "last", true);
        }
        let cmoe = &reports[reports.len() - 1].1;
        md.push_str(&format!(
            "\nImmediate: each task right after training it (LLaVA-CMoE: with its own router). \
             Last: after the last task (LLaVA-CMoE: routed by PTL; it located {} of the test \
             questions). BWT: mean over all tasks of Last - Immediate (the paper's). Trainable \
             parameters: the mean over tasks of what each task trained (LLaVA-CMoE: its new \
             experts, its router and its VAE; the baselines: every adapter), plus {} in the \
             initial phase for LLaVA-CMoE.\n",
            number(&cmoe["ptl_accuracy"], 3),
            cmoe["initial_params"]
        ));
        let name = format!("paper-table1-{}", self.preset);
        self.write(
            &name,
            &md,
            &json!({ "table": "1", "preset": self.preset, "backend": self.backend, "tasks": tasks, "rows": rows }),
        )?;
        (self.plot)(&self.out.join(format!("{name}.json")))
    }

    /// The paper's ablation tables, each over its own runs (the default LLaVA-CMoE run is
    /// shared): Table 2 left (w/o extension), Table 2 right (random / every-layer / PGKE with
    /// the parameter ratio), Table 3 (task order), Table 4 (experts added per layer), Table 5
    /// left (router choice) and the appendix's Table 5 (PTL feature).
    pub fn ablations(&self) -> anyhow::Result<()> {
        let cmoe = || RunSpec("cmoe".into());
        let spec = |s: &str| RunSpec(s.into());
        let mut md = format!(
            "# The paper's ablations on Mini-CoIN ({} preset, {})\n\n",
            self.preset, self.backend
        );
        let mut tables = Vec::new();
        let mut add =
            |title: &str, columns: Vec<Column>, extra: &[Summary]| -> anyhow::Result<()> {
                let (text, value) = self.ablation(title, &columns, extra)?;
                md.push_str(&text);
                tables.push(value);
                Ok(())
            };
        add(
            "Table 2 (left): w/o extension vs extension (Last)",
            vec![
                Column::new("w/o extension", spec("cmoe:plan=no-extension"), "last"),
                Column::new("Extend", cmoe(), "last"),
            ],
            &[Summary::Bwt, Summary::Params],
        )?;
        add(
            "Table 2 (right): where new experts go (Immediate)",
            vec![
                Column::new("Random", spec("cmoe:plan=random"), "immediate"),
                Column::new("Every-layer", spec("cmoe:plan=every-layer"), "immediate"),
                Column::new("Ours (PGKE)", cmoe(), "immediate"),
            ],
            &[Summary::MeanLast, Summary::Params, Summary::ParamRatio],
        )?;
        add(
            "Table 3: task order (Immediate / Last)",
            vec![
                Column::new("Norm Immediate", cmoe(), "immediate"),
                Column::new(
                    "Rev Immediate",
                    spec("cmoe:task-order=reverse"),
                    "immediate",
                ),
                Column::new(
                    "Rand Immediate",
                    spec("cmoe:task-order=random"),
                    "immediate",
                ),
                Column::new("Norm Last", cmoe(), "last"),
                Column::new("Rev Last", spec("cmoe:task-order=reverse"), "last"),
                Column::new("Rand Last", spec("cmoe:task-order=random"), "last"),
            ],
            &[Summary::Bwt],
        )?;
        add(
            "Table 4: experts added per selected layer (Immediate)",
            vec![
                Column::new("1", cmoe(), "immediate"),
                Column::new("4", spec("cmoe:experts-per-layer=4"), "immediate"),
                Column::new("8", spec("cmoe:experts-per-layer=8"), "immediate"),
            ],
            &[Summary::MeanLast, Summary::Params],
        )?;
        add(
            "Table 5 (left): which router answers (Last)",
            vec![
                Column::new("Last task's", spec("cmoe:router=last"), "last"),
                Column::new("Random", spec("cmoe:router=random"), "last"),
                Column::new("Ours (PTL)", cmoe(), "last"),
            ],
            &[Summary::Bwt],
        )?;
        add(
            "Table 5 (appendix): PTL's feature (Last)",
            vec![
                Column::new("last token (paper)", cmoe(), "last"),
                Column::new("question mean", spec("cmoe:ptl-feature=mean"), "last"),
                Column::new("both", spec("cmoe:ptl-feature=both"), "last"),
            ],
            &[Summary::Bwt, Summary::PtlAccuracy],
        )?;
        self.write(
            &format!("paper-ablations-{}", self.preset),
            &md,
            &json!({ "preset": self.preset, "backend": self.backend, "tables": tables }),
        )
    }

    /// One ablation table: tasks as rows (in CoIN's order, whatever a run's order), one column
    /// per run and metric, then the summary rows.
    fn ablation(
        &self,
        title: &str,
        columns: &[Column],
        summaries: &[Summary],
    ) -> anyhow::Result<(String, Value)> {
        let reports: Vec<Value> = columns
            .iter()
            .map(|c| self.report(&c.run))
            .collect::<anyhow::Result<_>>()?;
        let tasks = canonical_tasks(&reports[0]);
        let values: Vec<Vec<Option<f64>>> = columns
            .iter()
            .zip(&reports)
            .map(|(c, r)| per_task(r, c.metric, &tasks))
            .collect();
        let mut md = format!(
            "## {title}\n\n| task | {} |\n|---|{}\n",
            columns
                .iter()
                .map(|c| c.label.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(columns.len())
        );
        for (i, task) in tasks.iter().enumerate() {
            let row: Vec<String> = values.iter().map(|v| cell(v[i])).collect();
            md.push_str(&format!("| {task} | {} |\n", row.join(" | ")));
        }
        let mean_row: Vec<String> = values
            .iter()
            .map(|v| {
                let known: Vec<f64> = v.iter().flatten().copied().collect();
                cell((!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64))
            })
            .collect();
        md.push_str(&format!("| Mean | {} |\n", mean_row.join(" | ")));
        let every = columns.iter().position(|c| c.label == "Every-layer");
        for summary in summaries {
            let (label, row): (&str, Vec<String>) = match summary {
                Summary::Bwt => (
                    "BWT",
                    reports.iter().map(|r| number(&r["bwt"], 2)).collect(),
                ),
                Summary::MeanLast => (
                    "Mean Last",
                    reports.iter().map(|r| number(&r["mean_last"], 2)).collect(),
                ),
                Summary::PtlAccuracy => (
                    "PTL location accuracy",
                    reports
                        .iter()
                        .map(|r| number(&r["ptl_accuracy"], 3))
                        .collect(),
                ),
                Summary::Params => (
                    "trainable params per task (mean)",
                    reports.iter().map(mean_params).collect(),
                ),
                Summary::ParamRatio => {
                    let Some(every) = every else { continue };
                    let base = added_experts(&reports[every]);
                    (
                        "experts added vs every-layer",
                        reports
                            .iter()
                            .map(|r| {
                                let added = added_experts(r);
                                match base {
                                    0 => "-".into(),
                                    b => format!("{:.2}", added as f64 / b as f64),
                                }
                            })
                            .collect(),
                    )
                }
            };
            md.push_str(&format!("| {label} | {} |\n", row.join(" | ")));
        }
        md.push('\n');
        let value = json!({
            "title": title,
            "tasks": tasks,
            "columns": columns.iter().zip(&values).zip(&reports).map(|((c, v), r)| json!({
                "label": c.label,
                "run": c.run.0,
                "metric": c.metric,
                "accuracy": v,
                "mean_immediate": r["mean_immediate"],
                "mean_last": r["mean_last"],
                "bwt": r["bwt"],
                "ptl_accuracy": r["ptl_accuracy"],
                "trainable_params_per_task": mean_params_value(r),
                "experts_added": added_experts(r),
            })).collect::<Vec<_>>(),
        });
        Ok((md, value))
    }
}

/// A column of an ablation table: a run and which row of its report.
struct Column {
    label: String,
    run: RunSpec,
    metric: &'static str,
}

impl Column {
    fn new(label: &str, run: RunSpec, metric: &'static str) -> Self {
        Self {
            label: label.into(),
            run,
            metric,
        }
    }
}

/// A summary row under an ablation table.
enum Summary {
    Bwt,
    MeanLast,
    PtlAccuracy,
    Params,
    /// Experts added over all tasks, relative to the every-layer column.
    ParamRatio,
}

fn paper_name(method: &str) -> &'static str {
    match method {
        "lora" => "LoRA",
        "moelora" => "MoELoRA",
        "ewc" => "EWC",
        "lwf" => "LwF",
        "multitask" => "MoELoRA (all tasks at once)",
        _ => "LLaVA-CMoE",
    }
}

/// The report's task names, in its training order.
fn task_names(r: &Value) -> Vec<String> {
    r["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The report's tasks in CoIN's order (the order of its configuration's task list, before any
/// reordering): a run trained in reverse shows its columns like the others.
fn canonical_tasks(r: &Value) -> Vec<String> {
    let mut tasks = task_names(r);
    let coin = [
        "ScienceQA",
        "TextVQA",
        "ImageNet",
        "GQA",
        "VizWiz",
        "Grounding",
        "VQAv2",
        "OCRVQA",
    ];
    tasks.sort_by_key(|t| coin.iter().position(|c| c == t).unwrap_or(coin.len()));
    tasks
}

/// `r[key]` (a per-task list in the report's order) for `tasks`, matched by name.
fn per_task(r: &Value, key: &str, tasks: &[String]) -> Vec<Option<f64>> {
    let names = task_names(r);
    tasks
        .iter()
        .map(|t| {
            let i = names.iter().position(|n| n == t)?;
            r[key].get(i)?.as_f64()
        })
        .collect()
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

fn cells(v: &[Option<f64>]) -> String {
    v.iter().map(|x| cell(*x)).collect::<Vec<_>>().join(" | ")
}

fn number(v: &Value, decimals: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.decimals$}"))
}

/// `value` of each report as "mean ± std" (sample standard deviation), or the one value.
fn spread(reports: &[Value], value: impl Fn(&Value) -> Option<f64>, decimals: usize) -> String {
    let values: Vec<f64> = reports.iter().filter_map(value).collect();
    match values.len() {
        0 => "-".into(),
        1 => format!("{:.decimals$}", values[0]),
        n => {
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            format!("{mean:.decimals$} ± {:.decimals$}", var.sqrt())
        }
    }
}

fn mean_params_value(r: &Value) -> Option<f64> {
    let params: Vec<f64> = r["trainable_params_per_task"]
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    (!params.is_empty()).then(|| params.iter().sum::<f64>() / params.len() as f64)
}

fn mean_params(r: &Value) -> String {
    mean_params_value(r).map_or("-".into(), |p| format!("{:.0}", p))
}

/// Experts the tasks added over all layers: the growth of `experts_per_layer` from the
/// initial experts to after the last task.
fn added_experts(r: &Value) -> u64 {
    let total = |row: &Value| -> u64 {
        row.as_array()
            .map_or(0, |a| a.iter().filter_map(Value::as_u64).sum())
    };
    let rows = r["experts_per_layer"].as_array();
    let last = rows.and_then(|a| a.last()).map_or(0, total);
    let layers = rows
        .and_then(|a| a.last())
        .and_then(Value::as_array)
        .map_or(0, Vec::len) as u64;
    let initial = r["config"]["moe"]["initial_experts"].as_u64().unwrap_or(0) * layers;
    last.saturating_sub(initial)
}
