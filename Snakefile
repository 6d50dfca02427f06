# avepipe: audio-visual event localization, end to end.
#   snakemake --cores 2                                   # the embedded synthetic demo
#   snakemake --cores 8 --configfile workflow/config/ave.yaml
# Rules are thin: each calls one `avepipe` subcommand; the logic lives in the package.

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/heads.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        all_targets(),
    default_target: True
