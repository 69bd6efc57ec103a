//! Probe-Guided Knowledge Extension: from the activation statistics of the probe stage to an
//! expansion plan (which layers get how many new experts, copied from which expert).
//!
//! Statistics: over the eval subset, the frequency with which each expert (old and probe) is
//! among a token's top-k. Per layer, `threshold = mean(freq) - alpha * std(freq)` over the layer's
//! experts (population std); `N_s` = the probes whose frequency exceeds it. A layer with `N_s > 0`
//! needs capacity and gets `N_s` new experts (or a fixed `K`, the paper's Sec. 4.3 variant).
//! The plan is plain data: logged, saved, and suppliable by hand; [`ExpansionPlan::every_layer`]
//! and [`ExpansionPlan::random_layers`] build the paper's two ablations.

use serde::{Deserialize, Serialize};

/// How many experts a selected layer receives (paper main results: one; Table 4: 1 / 4 / 8).
/// Written as a number (`4`) or `probe-count` in settings files and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NumberOrText", into = "String")]
pub enum ExpansionMode {
    /// As many as probes above the threshold (`N_s`).
    ProbeCount,
    /// A fixed number per selected layer.
    Fixed(usize),
}

impl std::str::FromStr for ExpansionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "probe-count" => Ok(Self::ProbeCount),
            n => match n.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Self::Fixed(k)),
                _ => Err(format!(
                    "experts per layer: `{n}` is neither a positive number nor `probe-count`"
                )),
            },
        }
    }
}

/// An [`ExpansionMode`] as written in a settings file: `4` or `"probe-count"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl TryFrom<NumberOrText> for ExpansionMode {
    type Error = String;

    fn try_from(v: NumberOrText) -> Result<Self, String> {
        match v {
            NumberOrText::Number(n) => n.to_string().parse(),
            NumberOrText::Text(s) => s.parse(),
        }
    }
}

impl From<ExpansionMode> for String {
    fn from(mode: ExpansionMode) -> String {
        match mode {
            ExpansionMode::Fixed(k) => k.to_string(),
            ExpansionMode::ProbeCount => "probe-count".into(),
        }
    }
}

/// Where a plan came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanSource {
    /// Probe statistics (PGKE).
    Probe,
    /// Every layer (ablation).
    EveryLayer,
    /// Randomly chosen layers (ablation).
    Random,
    /// Supplied by hand.
    Manual,
    /// No new experts: every existing expert trains again (the "w/o extension" ablation).
    Unfrozen,
}

/// Per-layer top-k selection counts gathered on the eval subset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivationStats {
    /// `selections[layer][expert]`: tokens that had the expert in their top-k.
    pub selections: Vec<Vec<u64>>,
    /// `tokens[layer]`: tokens routed.
    pub tokens: Vec<u64>,
}

impl ActivationStats {
    /// Adds one batch of one layer.
    pub fn record(&mut self, layer: usize, selections: &[u64], tokens: u64) {
        if self.selections.len() <= layer {
            self.selections.resize(layer + 1, Vec::new());
            self.tokens.resize(layer + 1, 0);
        }
        let row = &mut self.selections[layer];
        if row.len() < selections.len() {
            row.resize(selections.len(), 0);
        }
        for (total, &s) in row.iter_mut().zip(selections) {
            *total += s;
        }
        self.tokens[layer] += tokens;
    }

    /// Activation frequency of each expert of `layer` (selections / tokens).
    pub fn frequencies(&self, layer: usize) -> Vec<f64> {
        let tokens = self.tokens[layer].max(1) as f64;
        self.selections[layer]
            .iter()
            .map(|&s| s as f64 / tokens)
            .collect()
    }
}

/// The expansion of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerExpansion {
    /// Decoder layer.
    pub layer: usize,
    /// New experts to add.
    pub add: usize,
    /// Expert whose weights initialise them (the most activated during probing; may be a probe).
    pub init_from: usize,
}

/// Which layers grow for a task, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpansionPlan {
    /// The task the plan is for.
    pub task: usize,
    /// How the plan was made.
    pub source: PlanSource,
    /// Layers that grow (others keep their experts).
    pub layers: Vec<LayerExpansion>,
    /// Per layer, the threshold used (empty unless from probe statistics).
    pub thresholds: Vec<f64>,
    /// Per layer, the probes above the threshold (`N_s`; empty unless from probe statistics).
    pub probes_above: Vec<usize>,
    /// Per layer, the activation frequency of every expert during probing, the old experts
    /// first and the probes last (empty unless from probe statistics).
    #[serde(default)]
    pub frequencies: Vec<Vec<f64>>,
    /// Per layer, the experts it had before probing (empty unless from probe statistics).
    #[serde(default)]
    pub old_experts: Vec<usize>,
}

impl ExpansionPlan {
    /// Total experts added.
    pub fn total_added(&self) -> usize {
        self.layers.iter().map(|l| l.add).sum()
    }

    /// The probes' activation frequencies in `layer` (empty without probe statistics).
    pub fn probe_frequencies(&self, layer: usize) -> &[f64] {
        match (self.frequencies.get(layer), self.old_experts.get(layer)) {
            (Some(freq), Some(&old)) => freq.get(old..).unwrap_or_default(),
            _ => &[],
        }
    }

    /// `layer`'s probes against its threshold as the log and the report print them
    /// (`0.42, 0.26 / 0.21`); `None` without probe statistics.
    pub fn probe_summary(&self, layer: usize) -> Option<String> {
        let threshold = self.thresholds.get(layer)?;
        let probes: Vec<String> = self
            .probe_frequencies(layer)
            .iter()
            .map(|f| format!("{f:.2}"))
            .collect();
        Some(format!("{} / {threshold:.2}", probes.join(", ")))
    }
}

impl ExpansionPlan {
    /// A plan adding `add` experts (copies of `init_from`) to each of `layers`.
    pub fn uniform(
        task: usize,
        source: PlanSource,
        layers: impl IntoIterator<Item = usize>,
        add: usize,
        init_from: usize,
    ) -> Self {
        Self {
            task,
            source,
            layers: layers
                .into_iter()
                .map(|layer| LayerExpansion {
                    layer,
                    add,
                    init_from,
                })
                .collect(),
            thresholds: Vec::new(),
            probes_above: Vec::new(),
            frequencies: Vec::new(),
            old_experts: Vec::new(),
        }
    }

    /// The every-layer ablation: `add` experts in every layer, initialised from expert `init_from`.
    pub fn every_layer(task: usize, layers: usize, add: usize, init_from: usize) -> Self {
        Self::uniform(task, PlanSource::EveryLayer, 0..layers, add, init_from)
    }

    /// The random-layer ablation: `count` distinct layers drawn with `seed`, `add` experts each.
    pub fn random_layers(
        task: usize,
        layers: usize,
        count: usize,
        add: usize,
        init_from: usize,
        seed: u64,
    ) -> Self {
        // xorshift: a dependency-free, reproducible draw.
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut pool: Vec<usize> = (0..layers).collect();
        let mut chosen = Vec::new();
        while chosen.len() < count.min(layers) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chosen.push(pool.swap_remove((state % pool.len() as u64) as usize));
        }
        chosen.sort_unstable();
        Self::uniform(task, PlanSource::Random, chosen, add, init_from)
    }
}

/// `mean - alpha * std` of `values` (population std).
pub fn threshold(values: &[f64], alpha: f64) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    mean - alpha * var.sqrt()
}

/// Plans an expansion from probe statistics. `old_experts[layer]` is the number of experts the
/// layer had before probing; experts from that index on are probes.
pub fn plan_from_stats(
    task: usize,
    stats: &ActivationStats,
    old_experts: &[usize],
    alpha: f64,
    mode: ExpansionMode,
) -> ExpansionPlan {
    let mut plan = ExpansionPlan {
        task,
        source: PlanSource::Probe,
        layers: Vec::new(),
        thresholds: Vec::new(),
        probes_above: Vec::new(),
        frequencies: Vec::new(),
        old_experts: old_experts.to_vec(),
    };
    for (layer, &old) in old_experts.iter().enumerate() {
        let freq = stats.frequencies(layer);
        let t = threshold(&freq, alpha);
        let n_s = freq[old..].iter().filter(|&&f| f > t).count();
        plan.thresholds.push(t);
        plan.probes_above.push(n_s);
        plan.frequencies.push(freq.clone());
        if n_s > 0 {
            let init_from = freq
                .iter()
                .enumerate()
                .fold(0, |best, (i, &f)| if f > freq[best] { i } else { best });
            let add = match mode {
                ExpansionMode::ProbeCount => n_s,
                ExpansionMode::Fixed(k) => k,
            };
            plan.layers.push(LayerExpansion {
                layer,
                add,
                init_from,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rows: &[&[u64]], tokens: u64) -> ActivationStats {
        let mut s = ActivationStats::default();
        for (layer, row) in rows.iter().enumerate() {
            s.record(layer, row, tokens);
        }
        s
    }

    #[test]
    fn threshold_is_mean_minus_alpha_std() {
        // mean 2.5, population std sqrt(1.25)
        let t = threshold(&[1.0, 2.0, 3.0, 4.0], 0.8);
        assert!((t - (2.5 - 0.8 * 1.25f64.sqrt())).abs() < 1e-12);
    }

    #[test]
    fn plan_selects_layers_whose_probes_are_used() {
        // 3 old experts + 2 probes per layer, 100 tokens, top-2 (200 selections per layer).
        let s = stats(
            &[
                &[60, 60, 60, 10, 10], // probes rarely used: thr = 40 - 0.8 * 24.5 = 20.4 -> none
                &[10, 20, 30, 90, 50], // both probes above thr 40 - 0.8 * 28.3 = 17.4; top is probe 3
                &[70, 70, 50, 0, 10],  // thr = 40 - 0.8 * 29.7 = 16.3 -> none (10 < 16.3)
                &[40, 40, 40, 40, 40], // flat: std 0, thr = 40, nothing strictly above
                &[50, 45, 5, 95, 5],   // thr = 40 - 0.8 * 33.5 = 13.2 -> probe 3 only
            ],
            100,
        );
        let plan = plan_from_stats(2, &s, &[3, 3, 3, 3, 3], 0.8, ExpansionMode::ProbeCount);
        assert_eq!(plan.probes_above, vec![0, 2, 0, 0, 1]);
        assert_eq!(plan.frequencies[1], vec![0.1, 0.2, 0.3, 0.9, 0.5]);
        assert_eq!(plan.probe_frequencies(1), [0.9, 0.5]);
        assert_eq!(plan.probe_summary(1).as_deref(), Some("0.90, 0.50 / 0.17"));
        assert_eq!(
            plan.layers,
            vec![
                LayerExpansion {
                    layer: 1,
                    add: 2,
                    init_from: 3
                },
                LayerExpansion {
                    layer: 4,
                    add: 1,
                    init_from: 3
                },
            ]
        );
        assert_eq!(plan.total_added(), 3);
        let fixed = plan_from_stats(2, &s, &[3, 3, 3, 3, 3], 0.8, ExpansionMode::Fixed(4));
        assert_eq!(
            fixed
                .layers
                .iter()
                .map(|l| (l.layer, l.add))
                .collect::<Vec<_>>(),
            vec![(1, 4), (4, 4)]
        );
        // A plan is data: it round-trips through JSON.
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<ExpansionPlan>(&json).unwrap(), plan);
    }

    #[test]
    fn ablation_plans() {
        let every = ExpansionPlan::every_layer(3, 4, 2, 0);
        assert_eq!(every.source, PlanSource::EveryLayer);
        assert_eq!(
            every
                .layers
                .iter()
                .map(|l| (l.layer, l.add))
                .collect::<Vec<_>>(),
            vec![(0, 2), (1, 2), (2, 2), (3, 2)]
        );
        let random = ExpansionPlan::random_layers(3, 32, 5, 1, 0, 42);
        let layers: Vec<usize> = random.layers.iter().map(|l| l.layer).collect();
        assert_eq!(layers.len(), 5);
        assert!(layers.windows(2).all(|w| w[0] < w[1]) && layers.iter().all(|&l| l < 32));
        // Reproducible from the seed, different for another seed.
        assert_eq!(ExpansionPlan::random_layers(3, 32, 5, 1, 0, 42), random);
        assert_ne!(
            ExpansionPlan::random_layers(3, 32, 5, 1, 0, 43).layers,
            random.layers
        );
        assert_eq!(
            ExpansionPlan::random_layers(3, 4, 9, 1, 0, 1).layers.len(),
            4
        );
    }
}
