//! The continual runner behind `cargo xtask train`: a stream of Mini-CoIN tasks learned one
//! after the other by LLaVA-CMoE or a baseline, every task seen so far evaluated after each one
//! (greedy generation, the CoIN scorers), checkpoints after every task and its evaluation, and
//! the report (`report.json`, `report.md`) at the end.
//!
//! - [`config`]: the settings and presets; [`devices`]: the devices a run trains on;
//!   [`dry_run`]: a run's needs checked and its memory planned; [`folder`]: a run's folder,
//!   progress and checkpoints; [`train`]: the training loop; [`eval`]: evaluation and zero-shot;
//!   [`report`]: the report and figures; [`ask`]: answering a new question;
//!   [`runtime`]: the model directory loaded; [`stage_log`]: a task's stages reported to the
//!   run's observer.

mod ask;
mod config;
mod devices;
mod dry_run;
mod eval;
mod folder;
mod report;
mod runtime;
mod stage_log;
mod train;

pub use ask::{Answer, AskTask};
/// How many experts each selected layer receives (`experts_per_layer`), the core's own type.
pub use cmoe_moe::pgke::{ExpansionMode, NewRouterColumns};
pub use config::check_image_size;
pub use config::{
    EwcSettings, InitChoice, LwfSettings, Method, PlanChoice, Preset, RouterChoice, RunConfig,
    TaskOrder, TaskSpec,
};
pub use devices::default_replicas;
pub use dry_run::{Check, DryRun, Target, TaskSteps, dry_run};
pub use eval::{EvalReport, EvalTask, generate_grouped, in_parallel};
pub use folder::{ExpandedTask, Progress};
pub use report::{Report, backward_transfer, make_report, rebuild_report, report_markdown};
pub use train::TrainTask;
