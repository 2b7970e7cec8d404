//! The sweep's runs in TensorBoard's HParams dashboard: `SWEEP_DIR/hparams/` holds one
//! event file with the experiment (the swept keys with their values, the metric names) and,
//! per table row (a run, or one flow of a reflow run), a session with its swept values as
//! hyperparameters and its final metrics as scalars. Laid out as PyTorch's `add_hparams`
//! writes it; `scripts/check_tensorboard_hparams.py` reads it back with TensorBoard itself.

use crate::logging::write_atomic;
use anyhow::{anyhow, Result};
use protobuf::well_known_types::{ListValue, Value};
use protobuf::{Message, RepeatedField};
use std::path::Path;
use tensorboard_proto::api::{DataType, Experiment, HParamInfo, MetricInfo, MetricName, Status};
use tensorboard_proto::event::Event;
use tensorboard_proto::plugin_hparams::{HParamsPluginData, SessionEndInfo, SessionStartInfo};
use tensorboard_proto::summary::{
    Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value,
};
use tensorboard_rs::record_writer::RecordWriter;

/// The folder of the HParams event files inside a sweep folder.
pub const DIR: &str = "hparams";
/// One fixed event-file name per folder, so that a new merge replaces the last one.
const EVENTS: &str = "events.out.tfevents.0000000000.flowmatch-hparams";

/// One row of the sweep table as a TensorBoard session.
pub struct Session {
    /// Its run name under `hparams/` (the run folder, or `RUN/rf2` for a reflow flow).
    pub name: String,
    /// The swept keys' values, as the table shows them.
    pub hparams: Vec<(String, String)>,
    /// Final metrics (non-finite ones are left out).
    pub metrics: Vec<(String, f64)>,
}

/// A table cell as a typed hyperparameter: a number, a boolean or text.
fn typed(cell: &str) -> (DataType, Value) {
    let mut v = Value::new();
    if let Ok(x) = cell.parse::<f64>() {
        v.set_number_value(x);
        (DataType::DATA_TYPE_FLOAT64, v)
    } else if let Ok(b) = cell.parse::<bool>() {
        v.set_bool_value(b);
        (DataType::DATA_TYPE_BOOL, v)
    } else {
        v.set_string_value(cell.to_string());
        (DataType::DATA_TYPE_STRING, v)
    }
}

/// A summary holding only HParams plugin data under `tag`.
fn plugin_summary(tag: &str, data: &HParamsPluginData) -> Result<Summary> {
    let mut plugin = SummaryMetadata_PluginData::new();
    plugin.set_plugin_name("hparams".into());
    plugin.set_content(data.write_to_bytes()?);
    let mut meta = SummaryMetadata::new();
    meta.set_plugin_data(plugin);
    let mut value = Summary_Value::new();
    value.set_tag(tag.into());
    value.set_metadata(meta);
    let mut s = Summary::new();
    s.set_value(RepeatedField::from_vec(vec![value]));
    Ok(s)
}

fn scalar(tag: &str, x: f64) -> Summary {
    let mut value = Summary_Value::new();
    value.set_tag(tag.into());
    value.set_simple_value(x as f32);
    let mut s = Summary::new();
    s.set_value(RepeatedField::from_vec(vec![value]));
    s
}

/// An event file of `summaries`, all at step 0, written atomically to `dir/EVENTS`.
fn write_events(dir: &Path, summaries: Vec<Summary>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
    let mut bytes = vec![];
    let mut w = RecordWriter::new(&mut bytes);
    let mut head = Event::new();
    head.set_file_version("brain.Event:2".into());
    w.write(&head.write_to_bytes()?)?;
    for s in summaries {
        let mut e = Event::new();
        e.set_step(0);
        e.set_summary(s);
        w.write(&e.write_to_bytes()?)?;
    }
    write_atomic(&dir.join(EVENTS), &bytes)?;
    Ok(())
}

/// Writes `sweep_dir/hparams/`: the experiment, then one session per entry of `sessions`.
/// `keys` are the swept keys in column order, `metrics` the metric names.
pub fn write(
    sweep_dir: &Path,
    keys: &[String],
    metrics: &[&str],
    sessions: &[Session],
) -> Result<()> {
    let root = sweep_dir.join(DIR);
    let mut exp = Experiment::new();
    exp.set_name(
        sweep_dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    let mut infos = vec![];
    let mut kinds = vec![];
    for key in keys {
        let mut values: Vec<&str> = vec![];
        for s in sessions {
            if let Some((_, v)) = s.hparams.iter().find(|(k, _)| k == key) {
                if !values.contains(&v.as_str()) {
                    values.push(v);
                }
            }
        }
        // One type per key: numbers only where every value is one, else text.
        let types: Vec<DataType> = values.iter().map(|v| typed(v).0).collect();
        let kind = match types.first() {
            Some(&t) if types.iter().all(|&u| u == t) => t,
            _ => DataType::DATA_TYPE_STRING,
        };
        let mut list = ListValue::new();
        list.set_values(RepeatedField::from_vec(
            values.iter().map(|v| value_as(kind, v)).collect(),
        ));
        kinds.push(kind);
        let mut info = HParamInfo::new();
        info.set_name(key.clone());
        info.set_field_type(kind);
        info.set_domain_discrete(list);
        infos.push(info);
    }
    exp.set_hparam_infos(RepeatedField::from_vec(infos));
    exp.set_metric_infos(RepeatedField::from_vec(
        metrics
            .iter()
            .map(|m| {
                let mut name = MetricName::new();
                name.set_tag(m.to_string());
                let mut info = MetricInfo::new();
                info.set_name(name);
                info
            })
            .collect(),
    ));
    let mut data = HParamsPluginData::new();
    data.set_experiment(exp);
    // Sessions of an earlier merge whose rows are gone (a sweep file that lost values) are
    // removed; every other file is replaced atomically, so that shards merging at the same
    // time never see a half-written or missing file.
    let keep: Vec<std::path::PathBuf> = std::iter::once(root.clone())
        .chain(sessions.iter().map(|s| root.join(&s.name)))
        .collect();
    for stale in event_files(&root) {
        if stale.parent().is_some_and(|d| !keep.iter().any(|k| k == d)) {
            let _ = std::fs::remove_file(&stale);
        }
    }
    write_events(&root, vec![plugin_summary("_hparams_/experiment", &data)?])?;
    for s in sessions {
        let mut start = SessionStartInfo::new();
        for ((k, v), &kind) in s.hparams.iter().zip(&kinds) {
            start.mut_hparams().insert(k.clone(), value_as(kind, v));
        }
        let mut open = HParamsPluginData::new();
        open.set_session_start_info(start);
        let mut end = SessionEndInfo::new();
        end.set_status(Status::STATUS_SUCCESS);
        let mut close = HParamsPluginData::new();
        close.set_session_end_info(end);
        let mut summaries = vec![plugin_summary("_hparams_/session_start_info", &open)?];
        summaries.extend(
            s.metrics
                .iter()
                .filter(|(_, x)| x.is_finite())
                .map(|(m, x)| scalar(m, *x)),
        );
        summaries.push(plugin_summary("_hparams_/session_end_info", &close)?);
        write_events(&root.join(&s.name), summaries)?;
    }
    Ok(())
}

/// `cell` as a value of type `kind`.
fn value_as(kind: DataType, cell: &str) -> Value {
    match kind {
        DataType::DATA_TYPE_STRING => {
            let mut v = Value::new();
            v.set_string_value(cell.to_string());
            v
        }
        _ => typed(cell).1,
    }
}

/// Our event files under `dir`, at any depth.
fn event_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(event_files(&p));
        } else if e.file_name() == EVENTS {
            out.push(p);
        }
    }
    out
}
