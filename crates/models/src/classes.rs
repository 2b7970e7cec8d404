//! A conditional model's label table: `K + 1` learned rows (the last one means "no label"),
//! joined to the model's time embedding (or first pre-activation).

use crate::{ModelError, Params};
use candle_core::{Result, Tensor};

/// The table of a model conditioned on `K` classes; empty for an unconditional model.
#[derive(Default)]
pub(crate) struct ClassTable(Option<Tensor>);

impl ClassTable {
    /// `classes + 1` rows of `width`, drawn after the model's other weights (an unconditional
    /// model draws the same weights as before labels existed); none for 0 classes.
    pub(crate) fn new(
        p: &mut Params,
        classes: usize,
        width: usize,
    ) -> std::result::Result<Self, ModelError> {
        if classes == 0 {
            return Ok(Self(None));
        }
        Ok(Self(Some(p.tensor(
            "class_emb",
            &[classes + 1, width],
            1.0,
        )?)))
    }

    /// The classes `K` (0: unconditional).
    pub(crate) fn classes(&self) -> usize {
        self.0.as_ref().map_or(0, |t| t.dims()[0] - 1)
    }

    /// `base + rows(y)`: each batch row gets its label's row (`y`: `(B,)` u32).
    pub(crate) fn join(&self, base: &Tensor, y: &Tensor) -> Result<Tensor> {
        match &self.0 {
            Some(t) => {
                base + t
                    .index_select(&y.flatten_all()?, 0)?
                    .to_dtype(base.dtype())?
            }
            None => candle_core::bail!("this model reads no class labels (model.classes = 0)"),
        }
    }
}

/// A model that can read class labels: the embedding its table joins, and where the table
/// lives. `with_classes` is the same for all four models.
pub(crate) trait Conditional: Sized {
    /// The width of the embedding (or pre-activation) the label rows are added to.
    fn class_width(&self) -> usize;

    /// The model's table (empty until [`Conditional::with_classes`]).
    fn class_table(&mut self) -> &mut ClassTable;

    /// The model conditioned on `classes` labels (its table drawn after the other weights).
    fn with_classes(
        mut self,
        p: &mut Params,
        classes: usize,
    ) -> std::result::Result<Self, ModelError> {
        let width = self.class_width();
        *self.class_table() = ClassTable::new(p, classes, width)?;
        Ok(self)
    }
}
