-- Lmod modulefile for lithops-hpc. Install as <modulepath>/lithops-hpc/<version>.lua
-- and set `prefix` below to where lithops-hpc was installed (meson --prefix).
local version = "0.1.0"
local prefix = "/opt/lithops-hpc/" .. version          -- site: edit

help([[
lithops-hpc ]] .. version .. [[: run Lithops workers on Slurm nodes in
Singularity/Apptainer containers, started by one batch job.

  sbatch -N4 $LITHOPS_HPC_ROOT/share/lithops-hpc/slurm/lithops-deploy.sh IMAGE.sif
  lithops-hpc status          health of your deployment
  lithops-hpc stop            drain and stop it
  man lithops-hpc             everything else

Configuration: $LITHOPS_HPC_CONFIG, else ~/.config/lithops-hpc/config.toml,
else /etc/lithops-hpc/config.toml. This module points LITHOPS_HPC_CONFIG at
the site's file unless you set it or have your own.
]])

whatis("Name: lithops-hpc")
whatis("Version: " .. version)
whatis("Category: tools, serverless, workflow")
whatis("Description: Lithops workers on Slurm clusters (Singularity/Apptainer, MPI)")
whatis("URL: https://github.com/lithops-cloud/lithops")

-- Site: the container engine and MPI the nodes need, if they are modules too.
-- depends_on("apptainer")
-- depends_on("openmpi")

setenv("LITHOPS_HPC_ROOT", prefix)
prepend_path("PATH", pathJoin(prefix, "bin"))
-- An empty element in MANPATH stands for the system's pages: without it, a
-- MANPATH that was unset would hide them from `man`.
if (os.getenv("MANPATH") or "") == "" then
  append_path("MANPATH", "")
end
prepend_path("MANPATH", pathJoin(prefix, "share/man"))

-- The site configuration, as a default only: LITHOPS_HPC_CONFIG wins over the
-- user's ~/.config file, so it is set only when the user has neither. The
-- marker variable makes unload undo exactly what load did.
local site_config = pathJoin(prefix, "etc/lithops-hpc/config.toml")
local xdg = os.getenv("XDG_CONFIG_HOME") or pathJoin(os.getenv("HOME") or "", ".config")
local user_config = pathJoin(xdg, "lithops-hpc/config.toml")
if mode() == "unload" then
  if os.getenv("LITHOPS_HPC_CONFIG_FROM_MODULE") then
    setenv("LITHOPS_HPC_CONFIG", site_config)
    setenv("LITHOPS_HPC_CONFIG_FROM_MODULE", "1")
  end
elseif os.getenv("LITHOPS_HPC_CONFIG") == nil and not isFile(user_config) and isFile(site_config) then
  setenv("LITHOPS_HPC_CONFIG", site_config)
  setenv("LITHOPS_HPC_CONFIG_FROM_MODULE", "1")
end
