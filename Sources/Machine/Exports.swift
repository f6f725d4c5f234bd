// The devices are part of what a Machine user sees (console lines, the UART).
@_exported import Devices
