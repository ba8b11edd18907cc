"""Every refusal of bad input, in the order a run meets them.

1. Config keys and values (`config.py`): an unknown key, a value the model
   or the pipeline cannot honour, a batch that does not split over the
   mesh. Checked before anything is built or compiled.
2. Data specs and the label space (`data.py`): the eval shards exist and
   hold records; the label map and a sample of the records' labels fit
   model.num_classes. Checked once the train index is built.
3. The run directory (`workdir.py`): writable, and a checkpoint resumed
   only under the config it was trained with.
4. The error itself (`errors.py`): UserError, which every refusal raises
   and every tool reports as one line, exit status 1.

The input layer (stat_jax/data/) raises UserError for a bad shard or spec
as it reads; what can be checked before reading is checked here. This
package's __init__ imports nothing, so that the input layer can import
errors.py without the checks above it.
"""
