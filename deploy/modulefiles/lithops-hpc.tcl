#%Module1.0
## Environment Modules (Tcl) modulefile for lithops-hpc. Install as
## <modulepath>/lithops-hpc/<version> and set `prefix` below to where
## lithops-hpc was installed (meson --prefix). Lmod reads this file too.

set version 0.1.0
set prefix  /opt/lithops-hpc/$version                   ;# site: edit

proc ModulesHelp { } {
    global version
    puts stderr "lithops-hpc $version: run Lithops workers on Slurm nodes in"
    puts stderr "Singularity/Apptainer containers, started by one batch job.\n"
    puts stderr "  sbatch -N4 \$LITHOPS_HPC_ROOT/share/lithops-hpc/slurm/lithops-deploy.sh IMAGE.sif"
    puts stderr "  lithops-hpc status          health of your deployment"
    puts stderr "  lithops-hpc stop            drain and stop it"
    puts stderr "  man lithops-hpc             everything else\n"
    puts stderr "Configuration: \$LITHOPS_HPC_CONFIG, else ~/.config/lithops-hpc/config.toml,"
    puts stderr "else /etc/lithops-hpc/config.toml. This module points LITHOPS_HPC_CONFIG at"
    puts stderr "the site's file unless you set it or have your own."
}

module-whatis "Name: lithops-hpc"
module-whatis "Version: $version"
module-whatis "Description: Lithops workers on Slurm clusters (Singularity/Apptainer, MPI)"

conflict lithops-hpc
# Site: the container engine and MPI the nodes need, if they are modules too.
# prereq apptainer
# prereq openmpi

setenv       LITHOPS_HPC_ROOT $prefix
prepend-path PATH             $prefix/bin
# An empty element in MANPATH stands for the system's pages: without it, a
# MANPATH that was unset would hide them from `man`.
if {![info exists ::env(MANPATH)] || $::env(MANPATH) eq ""} {
    append-path MANPATH {}
}
prepend-path MANPATH          $prefix/share/man

# The site configuration, as a default only: LITHOPS_HPC_CONFIG wins over the
# user's ~/.config file, so it is set only when the user has neither. The
# marker variable makes unload undo exactly what load did.
set site_config $prefix/etc/lithops-hpc/config.toml
if {[info exists ::env(XDG_CONFIG_HOME)] && $::env(XDG_CONFIG_HOME) ne ""} {
    set user_config $::env(XDG_CONFIG_HOME)/lithops-hpc/config.toml
} elseif {[info exists ::env(HOME)]} {
    set user_config $::env(HOME)/.config/lithops-hpc/config.toml
} else {
    set user_config ""
}
if {[module-info mode unload] || [module-info mode remove]} {   ;# Lmod says remove
    if {[info exists ::env(LITHOPS_HPC_CONFIG_FROM_MODULE)]} {
        setenv LITHOPS_HPC_CONFIG $site_config
        setenv LITHOPS_HPC_CONFIG_FROM_MODULE 1
    }
} elseif {![info exists ::env(LITHOPS_HPC_CONFIG)] && ($user_config eq "" || ![file exists $user_config])
          && [file exists $site_config]} {
    setenv LITHOPS_HPC_CONFIG $site_config
    setenv LITHOPS_HPC_CONFIG_FROM_MODULE 1
}
