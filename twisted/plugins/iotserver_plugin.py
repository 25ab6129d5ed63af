# Import-free drop-in: twistd imports every drop-in before it installs the reactor the user asked
# for, so nothing here may import a reactor or a heavy module (it would break --reactor for
# every plugin).
from twisted.application.service import ServiceMaker

iotserver = ServiceMaker(
    "iotserver",
    "iotserver.tap",
    "Industrial IoT server: MQTT broker, Modbus TCP, OPC UA and a shared tag store",
    "iotserver",
)
